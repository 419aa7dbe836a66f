//! A small blocking NBD client (fixed newstyle, `NBD_OPT_GO`, simple
//! replies, one request at a time): the workload and verifier of
//! `nvmirror drill` and the tests. Several clients give concurrency.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::proto::{
    IHAVEOPT, NBDMAGIC, NBD_CMD_DISC, NBD_CMD_FLAG_FUA, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM,
    NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_INFO_EXPORT, NBD_OPT_GO, NBD_REP_ACK,
    NBD_REP_FLAG_ERROR, NBD_REP_INFO, NBD_REP_MAGIC, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC,
};

/// Replies larger than this are not believed (a corrupt stream).
const REPLY_DATA_MAX_BYTES: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("NBD connection to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("NBD server {addr} refused export `{export}` (reply type {reply_type:#x})")]
    Refused {
        addr: SocketAddr,
        export: String,
        reply_type: u32,
    },
    #[error("NBD server {addr} broke the protocol: {reason}")]
    Protocol { addr: SocketAddr, reason: String },
    #[error("NBD request failed with errno {errno}")]
    Errno { errno: u32 },
}

#[derive(Debug)]
pub struct NbdClient {
    addr: SocketAddr,
    stream: TcpStream,
    size_bytes: u64,
    next_cookie: u64,
}

impl NbdClient {
    /// Connect to `addr` and enter transmission on `export`. Every socket
    /// operation gives up after `timeout`.
    pub fn connect(
        addr: SocketAddr,
        export: &str,
        timeout: Duration,
    ) -> Result<NbdClient, ClientError> {
        let io = |source| ClientError::Io { addr, source };
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let mut client = NbdClient {
            addr,
            stream,
            size_bytes: 0,
            next_cookie: 1,
        };
        client.handshake(export)?;
        Ok(client)
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn protocol(&self, reason: impl Into<String>) -> ClientError {
        ClientError::Protocol {
            addr: self.addr,
            reason: reason.into(),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ClientError> {
        let addr = self.addr;
        self.stream
            .read_exact(buf)
            .map_err(|source| ClientError::Io { addr, source })
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<(), ClientError> {
        let addr = self.addr;
        self.stream
            .write_all(buf)
            .map_err(|source| ClientError::Io { addr, source })
    }

    fn read_u16(&mut self) -> Result<u16, ClientError> {
        let mut bytes = [0u8; 2];
        self.read_exact(&mut bytes)?;
        Ok(u16::from_be_bytes(bytes))
    }

    fn read_u32(&mut self) -> Result<u32, ClientError> {
        let mut bytes = [0u8; 4];
        self.read_exact(&mut bytes)?;
        Ok(u32::from_be_bytes(bytes))
    }

    fn read_u64(&mut self) -> Result<u64, ClientError> {
        let mut bytes = [0u8; 8];
        self.read_exact(&mut bytes)?;
        Ok(u64::from_be_bytes(bytes))
    }

    fn handshake(&mut self, export: &str) -> Result<(), ClientError> {
        if self.read_u64()? != NBDMAGIC || self.read_u64()? != IHAVEOPT {
            return Err(self.protocol("not a newstyle NBD server"));
        }
        let server_flags = self.read_u16()?;
        if server_flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.protocol("server does not speak fixed newstyle"));
        }
        let mut client_flags = NBD_FLAG_C_FIXED_NEWSTYLE;
        if server_flags & NBD_FLAG_NO_ZEROES != 0 {
            client_flags |= NBD_FLAG_C_NO_ZEROES;
        }
        let mut request = Vec::new();
        request.extend_from_slice(&client_flags.to_be_bytes());
        request.extend_from_slice(&IHAVEOPT.to_be_bytes());
        request.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        request.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        request.extend_from_slice(&(export.len() as u32).to_be_bytes());
        request.extend_from_slice(export.as_bytes());
        request.extend_from_slice(&0u16.to_be_bytes());
        self.write_all(&request)?;
        loop {
            if self.read_u64()? != NBD_REP_MAGIC {
                return Err(self.protocol("bad option reply magic"));
            }
            let _option = self.read_u32()?;
            let reply_type = self.read_u32()?;
            let len = self.read_u32()?;
            if len > REPLY_DATA_MAX_BYTES {
                return Err(self.protocol(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            self.read_exact(&mut data)?;
            match reply_type {
                NBD_REP_ACK => break,
                NBD_REP_INFO
                    if data.len() >= 12
                        && u16::from_be_bytes([data[0], data[1]]) == NBD_INFO_EXPORT =>
                {
                    self.size_bytes = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                }
                NBD_REP_INFO => {}
                error if error & NBD_REP_FLAG_ERROR != 0 => {
                    return Err(ClientError::Refused {
                        addr: self.addr,
                        export: export.to_owned(),
                        reply_type,
                    })
                }
                other => return Err(self.protocol(format!("unexpected option reply {other}"))),
            }
        }
        Ok(())
    }

    /// Send one request and wait for its reply; reads fill `read_into`.
    fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        read_into: Option<&mut [u8]>,
    ) -> Result<(), ClientError> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut header = [0u8; 28];
        header[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        header[4..6].copy_from_slice(&flags.to_be_bytes());
        header[6..8].copy_from_slice(&command.to_be_bytes());
        header[8..16].copy_from_slice(&cookie.to_be_bytes());
        header[16..24].copy_from_slice(&offset.to_be_bytes());
        header[24..28].copy_from_slice(&len.to_be_bytes());
        self.write_all(&header)?;
        if !payload.is_empty() {
            self.write_all(payload)?;
        }
        if command == NBD_CMD_DISC {
            return Ok(());
        }
        if self.read_u32()? != NBD_SIMPLE_REPLY_MAGIC {
            return Err(self.protocol("bad reply magic"));
        }
        let errno = self.read_u32()?;
        if self.read_u64()? != cookie {
            return Err(self.protocol("reply for another request"));
        }
        if errno != 0 {
            return Err(ClientError::Errno { errno });
        }
        if let Some(buf) = read_into {
            self.read_exact(buf)?;
        }
        Ok(())
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let len = buf.len() as u32;
        self.request(NBD_CMD_READ, 0, offset, len, &[], Some(buf))
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let flags = if fua { NBD_CMD_FLAG_FUA } else { 0 };
        self.request(NBD_CMD_WRITE, flags, offset, data.len() as u32, data, None)
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(NBD_CMD_WRITE_ZEROES, 0, offset, len, &[], None)
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(NBD_CMD_TRIM, 0, offset, len, &[], None)
    }

    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.request(NBD_CMD_FLUSH, 0, 0, 0, &[], None)
    }

    /// NBD_CMD_DISC, then close.
    pub fn disconnect(mut self) {
        let _ = self.request(NBD_CMD_DISC, 0, 0, 0, &[], None);
    }
}

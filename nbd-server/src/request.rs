//! Transmission requests: the 28-byte header parsed and validated into a typed [`Command`]
//! before any I/O, so that nothing past this point sees an unchecked offset or length.

use crate::proto::*;

/// A request header as read from the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// The header did not start with the request magic: the stream cannot be trusted any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("request magic {0:#010x} is not {REQUEST_MAGIC:#010x}")]
pub struct BadMagic(pub u32);

impl RequestHeader {
    pub fn parse(bytes: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, BadMagic> {
        let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let be16 = |at: usize| u16::from_be_bytes(bytes[at..at + 2].try_into().expect("2 bytes"));
        let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let magic = be32(0);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        Ok(RequestHeader {
            flags: be16(4),
            kind: be16(6),
            cookie: be64(8),
            offset: be64(16),
            length: be32(24),
        })
    }

    /// Bytes of payload that follow this header on the wire, whether or not it is valid.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.length
        } else {
            0
        }
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// A validated request: offsets and lengths are within the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        length: u32,
        df: bool,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        length: u32,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
    },
}

impl Command {
    /// The length of a ranged command (None for flush and disconnect).
    pub fn length(&self) -> Option<u32> {
        match *self {
            Command::Read { length, .. }
            | Command::Write { length, .. }
            | Command::Trim { length, .. }
            | Command::Cache { length, .. }
            | Command::WriteZeroes { length, .. }
            | Command::BlockStatus { length, .. } => Some(length),
            Command::Disconnect | Command::Flush => None,
        }
    }
}

/// What the export allows, as agreed in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub size_bytes: u64,
    /// Transmission flags as sent to the client.
    pub flags: u16,
    pub structured_replies: bool,
    pub base_allocation: bool,
}

/// Why a request was refused; each maps to the error the spec asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    #[error("unknown command flags {0:#x}")]
    UnknownFlags(u16),
    #[error("flags {flags:#x} do not apply to command {kind}")]
    FlagNotApplicable { kind: u16, flags: u16 },
    #[error("command {kind} was not offered in the handshake")]
    NotNegotiated { kind: u16 },
    #[error("the export is read-only")]
    ReadOnly,
    #[error("length {length} exceeds the maximum payload {MAX_PAYLOAD_BYTES}")]
    TooLong { length: u32 },
    #[error("range {offset}+{length} is outside the export of {size_bytes} bytes")]
    OutOfRange {
        offset: u64,
        length: u32,
        size_bytes: u64,
    },
    #[error("write range {offset}+{length} is beyond the end of the export ({size_bytes} bytes)")]
    WriteBeyondEnd {
        offset: u64,
        length: u32,
        size_bytes: u64,
    },
    #[error("block status of zero length")]
    ZeroLength,
}

impl RequestError {
    pub fn errno(&self) -> Errno {
        match self {
            RequestError::ReadOnly => Errno::Perm,
            // The spec: "SHOULD return NBD_ENOSPC if it receives a write request including one
            // or more sectors beyond the size of the device".
            RequestError::WriteBeyondEnd { .. } => Errno::NoSpc,
            _ => Errno::Inval,
        }
    }
}

const KNOWN_FLAGS: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

/// Validates a header against what the handshake agreed. Checks run from the cheapest and most
/// basic (is this a command at all) to the range check, so each request gets the first error.
pub fn validate(header: &RequestHeader, limits: &Limits) -> Result<Command, RequestError> {
    let RequestHeader {
        flags,
        kind,
        offset,
        length,
        ..
    } = *header;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(RequestError::UnknownFlags(flags & !KNOWN_FLAGS));
    }
    // FUA is valid on every command once offered; the others belong to one command each.
    let allowed = CMD_FLAG_FUA
        | match kind {
            CMD_READ => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
            _ => return Err(RequestError::UnknownCommand(kind)),
        };
    if flags & !allowed != 0 {
        return Err(RequestError::FlagNotApplicable {
            kind,
            flags: flags & !allowed,
        });
    }
    let offered = |flag: u16| limits.flags & flag != 0;
    let negotiated = match kind {
        CMD_FLUSH => offered(FLAG_SEND_FLUSH),
        CMD_TRIM => offered(FLAG_SEND_TRIM),
        CMD_CACHE => offered(FLAG_SEND_CACHE),
        CMD_WRITE_ZEROES => {
            offered(FLAG_SEND_WRITE_ZEROES)
                && (flags & CMD_FLAG_FAST_ZERO == 0 || offered(FLAG_SEND_FAST_ZERO))
        }
        CMD_BLOCK_STATUS => limits.base_allocation,
        CMD_READ => flags & CMD_FLAG_DF == 0 || offered(FLAG_SEND_DF),
        _ => true,
    } && (flags & CMD_FLAG_FUA == 0 || offered(FLAG_SEND_FUA));
    if !negotiated {
        return Err(RequestError::NotNegotiated { kind });
    }
    let writes = matches!(kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && offered(FLAG_READ_ONLY) {
        return Err(RequestError::ReadOnly);
    }
    if matches!(kind, CMD_READ | CMD_WRITE) && length > MAX_PAYLOAD_BYTES {
        return Err(RequestError::TooLong { length });
    }
    if kind == CMD_BLOCK_STATUS && length == 0 {
        return Err(RequestError::ZeroLength);
    }
    let ranged = !matches!(kind, CMD_DISC | CMD_FLUSH);
    let in_range = offset
        .checked_add(u64::from(length))
        .is_some_and(|end| end <= limits.size_bytes);
    if ranged && !in_range {
        let size_bytes = limits.size_bytes;
        return Err(if matches!(kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            RequestError::WriteBeyondEnd {
                offset,
                length,
                size_bytes,
            }
        } else {
            RequestError::OutOfRange {
                offset,
                length,
                size_bytes,
            }
        });
    }
    let fua = flags & CMD_FLAG_FUA != 0;
    Ok(match kind {
        CMD_READ => Command::Read {
            offset,
            length,
            df: flags & CMD_FLAG_DF != 0,
        },
        CMD_WRITE => Command::Write {
            offset,
            length,
            fua,
        },
        CMD_DISC => Command::Disconnect,
        CMD_FLUSH => Command::Flush,
        CMD_TRIM => Command::Trim {
            offset,
            length,
            fua,
        },
        CMD_CACHE => Command::Cache { offset, length },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole: flags & CMD_FLAG_NO_HOLE != 0,
            fast: flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS => Command::BlockStatus {
            offset,
            length,
            req_one: flags & CMD_FLAG_REQ_ONE != 0,
        },
        _ => unreachable!("unknown commands were refused above"),
    })
}

#[cfg(test)]
mod tests;

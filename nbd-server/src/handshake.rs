//! Fixed-newstyle option negotiation, without I/O: the connection reads one option, hands its
//! bytes to [`Negotiation::handle`], writes what it encoded, and acts on the [`Outcome`].
//!
//! TLS (the spec's "TLS support"): a listener offers none ([`TlsOffer::None`], the spec's
//! NOTLS: STARTTLS is refused with `NBD_REP_ERR_POLICY`), lets clients choose
//! ([`TlsOffer::Optional`]: every export may be used either way, so SELECTIVETLS with no
//! TLS-only export), or insists ([`TlsOffer::Required`], FORCEDTLS: until TLS runs every option
//! but STARTTLS and ABORT is answered `NBD_REP_ERR_TLS_REQD`, and `NBD_OPT_EXPORT_NAME`, which
//! cannot be answered with an error, closes the connection). STARTTLS is acknowledged with
//! [`Outcome::StartTls`]; the connection runs the TLS handshake and calls
//! [`Negotiation::tls_started`], which forgets what was negotiated before, as the spec demands.

use crate::proto::*;

/// What the server knows of one export while negotiating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
    /// Transmission flags, without `FLAG_SEND_DF` (added once structured replies are agreed).
    pub flags: u16,
}

/// Errors that end the negotiation: the connection closes without a reply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// The client's flags carry bits we did not offer.
    #[error("client flags {0:#x} carry unknown bits")]
    UnknownClientFlags(u32),
    /// An option header did not start with "IHAVEOPT".
    #[error("option header magic {0:#x} is not IHAVEOPT")]
    BadOptionMagic(u64),
}

/// The client's flags, as sent right after our greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// The 18 bytes a server sends first.
pub fn greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

pub fn parse_client_flags(bytes: [u8; 4]) -> Result<ClientFlags, HandshakeError> {
    let flags = u32::from_be_bytes(bytes);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::UnknownClientFlags(flags));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// Parses a 16-byte option header into (option, data length).
pub fn parse_option_header(bytes: &[u8; 16]) -> Result<(u32, u32), HandshakeError> {
    let magic = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
    if magic != IHAVEOPT {
        return Err(HandshakeError::BadOptionMagic(magic));
    }
    let option = u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(bytes[12..16].try_into().expect("4 bytes"));
    Ok((option, len))
}

/// What a listener offers of TLS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsOffer {
    /// No TLS here (a unix socket, or TCP with `--tls off`).
    #[default]
    None,
    /// Clients may start TLS, or go on without it.
    Optional,
    /// Nothing is served before TLS runs.
    Required,
}

/// Where the negotiation goes after an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Replies are encoded; read the next option.
    Continue,
    /// The client aborted (ACK encoded); close after sending it.
    Abort,
    /// Enter transmission with this export (after sending what was encoded).
    Transmission(Agreement),
    /// `NBD_OPT_EXPORT_NAME` named no export (or came before a required TLS): the spec allows
    /// no error reply, so close.
    Close,
    /// STARTTLS was acknowledged: send the ACK, run the TLS handshake on the socket, call
    /// [`Negotiation::tls_started`], and read the next option inside TLS.
    StartTls,
}

/// What both sides agreed on for the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    pub export_index: usize,
    pub structured_replies: bool,
    /// `base:allocation` was selected for this export, so BLOCK_STATUS is allowed.
    pub base_allocation: bool,
    /// The transmission flags the client was told.
    pub flags: u16,
}

/// Negotiation state of one connection.
#[derive(Debug, Default)]
pub struct Negotiation {
    no_zeroes: bool,
    structured_replies: bool,
    /// Export (index) for which `base:allocation` was selected by the last SET_META_CONTEXT.
    meta_export: Option<usize>,
    tls: TlsOffer,
    tls_running: bool,
    /// The first option refused because TLS was required and not running (for the log).
    refused_for_tls: Option<u32>,
}

impl Negotiation {
    pub fn new(client: ClientFlags, tls: TlsOffer) -> Negotiation {
        Negotiation {
            no_zeroes: client.no_zeroes,
            tls,
            ..Negotiation::default()
        }
    }

    /// The TLS handshake after [`Outcome::StartTls`] succeeded: options from now on arrive
    /// inside TLS, and nothing negotiated before counts ("the server MUST NOT preserve any
    /// negotiation state ... issued before this command").
    pub fn tls_started(&mut self) {
        self.structured_replies = false;
        self.meta_export = None;
        self.tls_running = true;
    }

    /// Whether options now arrive inside TLS.
    pub fn tls_running(&self) -> bool {
        self.tls_running
    }

    /// The first option refused because this listener requires TLS and the client had not
    /// started it: a client that gave up after it was a plaintext client.
    pub fn refused_for_tls(&self) -> Option<u32> {
        self.refused_for_tls
    }

    /// Handles one option whose data is `data`, encoding replies into `out`.
    pub fn handle(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &[ExportInfo],
        out: &mut Vec<u8>,
    ) -> Outcome {
        if let Some(refused) = self.refuse_before_tls(option, out) {
            return refused;
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(data, exports, out),
            OPT_ABORT => {
                reply(out, option, REP_ACK, &[]);
                Outcome::Abort
            }
            OPT_LIST => {
                if !data.is_empty() {
                    return error(out, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                }
                for export in exports {
                    let mut body = Vec::with_capacity(4 + export.name.len());
                    put_string(&mut body, &export.name);
                    body.extend_from_slice(export.description.as_bytes());
                    reply(out, option, REP_SERVER, &body);
                }
                reply(out, option, REP_ACK, &[]);
                Outcome::Continue
            }
            OPT_STARTTLS => self.start_tls(data, out),
            OPT_INFO | OPT_GO => self.info_or_go(option, data, exports, out),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return error(
                        out,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
                self.structured_replies = true;
                reply(out, option, REP_ACK, &[]);
                Outcome::Continue
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, exports, out)
            }
            _ => error(out, option, REP_ERR_UNSUP, "option not supported"),
        }
    }

    /// Answers an option whose data was longer than [`MAX_OPTION_BYTES`] (and was drained).
    pub fn too_big(&mut self, option: u32, out: &mut Vec<u8>) -> Outcome {
        if let Some(refused) = self.refuse_before_tls(option, out) {
            return refused;
        }
        error(out, option, REP_ERR_TOO_BIG, "option data too long")
    }

    /// FORCEDTLS before TLS runs: every option but STARTTLS and ABORT is refused.
    fn refuse_before_tls(&mut self, option: u32, out: &mut Vec<u8>) -> Option<Outcome> {
        if self.tls != TlsOffer::Required
            || self.tls_running
            || matches!(option, OPT_STARTTLS | OPT_ABORT)
        {
            return None;
        }
        self.refused_for_tls.get_or_insert(option);
        if option == OPT_EXPORT_NAME {
            return Some(Outcome::Close);
        }
        Some(error(out, option, REP_ERR_TLS_REQD, TLS_REQUIRED))
    }

    fn start_tls(&mut self, data: &[u8], out: &mut Vec<u8>) -> Outcome {
        let refusal = if self.tls == TlsOffer::None {
            Some((REP_ERR_POLICY, "TLS is not offered here"))
        } else if self.tls_running {
            Some((REP_ERR_INVALID, "TLS is already running"))
        } else if !data.is_empty() {
            Some((REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data"))
        } else {
            None
        };
        if let Some((kind, message)) = refusal {
            return error(out, OPT_STARTTLS, kind, message);
        }
        reply(out, OPT_STARTTLS, REP_ACK, &[]);
        Outcome::StartTls
    }

    fn export_name(&mut self, data: &[u8], exports: &[ExportInfo], out: &mut Vec<u8>) -> Outcome {
        let Ok(name) = std::str::from_utf8(data) else {
            return Outcome::Close;
        };
        let Some(index) = find_export(exports, name) else {
            return Outcome::Close;
        };
        let agreement = self.agreement(index, exports);
        out.extend_from_slice(&exports[index].size_bytes.to_be_bytes());
        out.extend_from_slice(&agreement.flags.to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        Outcome::Transmission(agreement)
    }

    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &[ExportInfo],
        out: &mut Vec<u8>,
    ) -> Outcome {
        let mut cursor = Cursor(data);
        let parsed = (|| {
            let name = cursor.string()?;
            let count = cursor.u16()? as usize;
            let mut requests = Vec::with_capacity(count.min(16));
            for _ in 0..count {
                requests.push(cursor.u16()?);
            }
            cursor.end()?;
            Some((name, requests))
        })();
        let Some((name, requests)) = parsed else {
            return error(
                out,
                option,
                REP_ERR_INVALID,
                "malformed NBD_OPT_INFO/GO data",
            );
        };
        let Some(index) = find_export(exports, name) else {
            return unknown_export(out, option, name, exports);
        };
        let export = &exports[index];
        let agreement = self.agreement(index, exports);
        let mut info = Vec::with_capacity(16);
        info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&export.size_bytes.to_be_bytes());
        info.extend_from_slice(&agreement.flags.to_be_bytes());
        reply(out, option, REP_INFO, &info);
        // Sent whether or not it was asked for: QEMU asks, and others may ignore it.
        info.clear();
        info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        for size in [BLOCK_SIZE_MIN, BLOCK_SIZE_PREFERRED, MAX_PAYLOAD_BYTES] {
            info.extend_from_slice(&size.to_be_bytes());
        }
        reply(out, option, REP_INFO, &info);
        if requests.contains(&INFO_NAME) {
            info.clear();
            info.extend_from_slice(&INFO_NAME.to_be_bytes());
            info.extend_from_slice(export.name.as_bytes());
            reply(out, option, REP_INFO, &info);
        }
        if requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
            info.clear();
            info.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
            info.extend_from_slice(export.description.as_bytes());
            reply(out, option, REP_INFO, &info);
        }
        reply(out, option, REP_ACK, &[]);
        if option == OPT_GO {
            Outcome::Transmission(agreement)
        } else {
            Outcome::Continue
        }
    }

    fn meta_context(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &[ExportInfo],
        out: &mut Vec<u8>,
    ) -> Outcome {
        let setting = option == OPT_SET_META_CONTEXT;
        if setting {
            // "Issuing this command replaces all previously-set metadata contexts (including when
            // this command fails)".
            self.meta_export = None;
        }
        if !self.structured_replies {
            return error(
                out,
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            );
        }
        let mut cursor = Cursor(data);
        let parsed = (|| {
            let name = cursor.string()?;
            let count = cursor.u32()?;
            let mut queries = Vec::new();
            for _ in 0..count {
                queries.push(cursor.string()?);
            }
            cursor.end()?;
            Some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            return error(out, option, REP_ERR_INVALID, "malformed meta context data");
        };
        let Some(index) = find_export(exports, name) else {
            return unknown_export(out, option, name, exports);
        };
        let selects = if setting {
            queries.contains(&META_BASE_ALLOCATION)
        } else {
            // Listing: no query lists everything; "base:" is the namespace wildcard.
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| *q == META_BASE_ALLOCATION || *q == "base:")
        };
        if selects {
            let mut body = Vec::with_capacity(4 + META_BASE_ALLOCATION.len());
            let id = if setting { META_BASE_ALLOCATION_ID } else { 0 };
            body.extend_from_slice(&id.to_be_bytes());
            body.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
            reply(out, option, REP_META_CONTEXT, &body);
            if setting {
                self.meta_export = Some(index);
            }
        }
        reply(out, option, REP_ACK, &[]);
        Outcome::Continue
    }

    fn agreement(&self, export_index: usize, exports: &[ExportInfo]) -> Agreement {
        let mut flags = exports[export_index].flags | FLAG_HAS_FLAGS;
        if self.structured_replies {
            flags |= FLAG_SEND_DF;
        }
        Agreement {
            export_index,
            structured_replies: self.structured_replies,
            base_allocation: self.meta_export == Some(export_index),
            flags,
        }
    }
}

/// The message of every `NBD_REP_ERR_TLS_REQD`.
const TLS_REQUIRED: &str = "TLS is required here: send NBD_OPT_STARTTLS first";

/// The spec's name of an option, for log lines.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "an unknown option",
    }
}

/// The empty name selects the default export, the first one.
fn find_export(exports: &[ExportInfo], name: &str) -> Option<usize> {
    if name.is_empty() && !exports.is_empty() {
        return Some(0);
    }
    exports.iter().position(|e| e.name == name)
}

fn unknown_export(out: &mut Vec<u8>, option: u32, name: &str, exports: &[ExportInfo]) -> Outcome {
    let names: Vec<&str> = exports.iter().map(|e| e.name.as_str()).collect();
    let message = format!(
        "no export named {name:?}; this server has: {}",
        names.join(", ")
    );
    error(out, option, REP_ERR_UNKNOWN, &message)
}

fn reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// An error reply; its data is a message for people, as the spec allows.
fn error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) -> Outcome {
    reply(out, option, reply_type, message.as_bytes());
    Outcome::Continue
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Bounds-checked reads over option data; `None` means malformed.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<&'a str> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_BYTES {
            return None;
        }
        std::str::from_utf8(self.take(len)?).ok()
    }
    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

#[cfg(test)]
mod tests;

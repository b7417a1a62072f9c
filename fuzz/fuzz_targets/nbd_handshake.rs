//! The fixed-newstyle negotiation driven as `connection.rs` drives it, over bytes a client sent:
//! `client flags u32 BE`, then options (`"IHAVEOPT" | option u32 | length u32 | data`). An option
//! longer than `MAX_OPTION_BYTES` is skipped and answered with `too_big`, as the server drains it;
//! input that ends inside an option is a client that hung up. Nothing may panic, every reply must
//! be well framed, and an agreement must name an export that exists. After an agreement, the rest
//! of the input is read as transmission requests validated against what was agreed. The input
//! runs once per TLS offer (none, optional, required); an acknowledged STARTTLS is taken to
//! succeed, and options go on as if inside TLS. Required TLS never lets a client in before it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_server::handshake::{
    parse_client_flags, parse_option_header, ExportInfo, Negotiation, Outcome, TlsOffer,
};
use nbd_server::proto::*;
use nbd_server::request::{validate, Limits, RequestHeader};

fn exports() -> Vec<ExportInfo> {
    vec![
        ExportInfo {
            name: "disk0".into(),
            description: "the first disk".into(),
            size_bytes: 1 << 30,
            flags: FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
                | FLAG_SEND_FAST_ZERO
                | FLAG_SEND_CACHE,
        },
        ExportInfo {
            name: "ro".into(),
            description: String::new(),
            size_bytes: 4097,
            flags: FLAG_READ_ONLY | FLAG_SEND_FLUSH,
        },
    ]
}

/// Checks that `out` is a sequence of option replies to `option`, each as long as it says.
fn check_replies(option: u32, mut out: &[u8]) {
    assert!(!out.is_empty(), "option {option} got no reply");
    while !out.is_empty() {
        let (head, rest) = out
            .split_first_chunk::<20>()
            .unwrap_or_else(|| panic!("reply header cut short: {out:?}"));
        let be32 = |at: usize| u32::from_be_bytes(head[at..at + 4].try_into().expect("4 bytes"));
        assert_eq!(
            u64::from_be_bytes(head[0..8].try_into().expect("8 bytes")),
            REPLY_MAGIC
        );
        assert_eq!(be32(8), option, "reply names another option");
        let len = be32(16) as usize;
        assert!(
            rest.len() >= len,
            "reply says {len} bytes, has {}",
            rest.len()
        );
        out = &rest[len..];
    }
}

fuzz_target!(|data: &[u8]| {
    for tls in [TlsOffer::None, TlsOffer::Optional, TlsOffer::Required] {
        negotiate(data, tls);
    }
});

fn negotiate(data: &[u8], tls: TlsOffer) {
    let Some((flags, mut input)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Ok(client) = parse_client_flags(*flags) else {
        return;
    };
    let exports = exports();
    let mut negotiation = Negotiation::new(client, tls);
    let mut out = Vec::new();
    let agreement = loop {
        let Some((header, rest)) = input.split_first_chunk::<16>() else {
            return;
        };
        let Ok((option, len)) = parse_option_header(header) else {
            return;
        };
        let Some(body) = rest.get(..len as usize) else {
            return;
        };
        input = &rest[len as usize..];
        out.clear();
        let outcome = if len > MAX_OPTION_BYTES {
            negotiation.too_big(option, &mut out)
        } else {
            negotiation.handle(option, body, &exports, &mut out)
        };
        match outcome {
            Outcome::Continue => check_replies(option, &out),
            Outcome::Abort => {
                check_replies(option, &out);
                return;
            }
            Outcome::Close => assert!(out.is_empty(), "Close after a reply"),
            Outcome::StartTls => {
                assert_ne!(tls, TlsOffer::None, "STARTTLS acknowledged without TLS");
                assert!(!negotiation.tls_running(), "STARTTLS acknowledged twice");
                check_replies(option, &out);
                negotiation.tls_started();
            }
            Outcome::Transmission(agreement) => {
                assert!(
                    tls != TlsOffer::Required || negotiation.tls_running(),
                    "transmission before the required TLS"
                );
                let export = exports
                    .get(agreement.export_index)
                    .expect("agreement names an export");
                assert!(agreement.flags & FLAG_HAS_FLAGS != 0);
                assert_eq!(
                    agreement.flags & !FLAG_SEND_DF,
                    export.flags | FLAG_HAS_FLAGS
                );
                assert_eq!(
                    agreement.flags & FLAG_SEND_DF != 0,
                    agreement.structured_replies
                );
                assert!(!agreement.base_allocation || agreement.structured_replies);
                if option == OPT_EXPORT_NAME {
                    let expected = if client.no_zeroes { 10 } else { 134 };
                    assert_eq!(out.len(), expected);
                } else {
                    check_replies(option, &out);
                }
                break agreement;
            }
        }
    };

    // Transmission, as the connection's reader loop sees it.
    let limits = Limits {
        size_bytes: exports[agreement.export_index].size_bytes,
        flags: agreement.flags,
        structured_replies: agreement.structured_replies,
        base_allocation: agreement.base_allocation,
    };
    while let Some((head, rest)) = input.split_first_chunk::<REQUEST_HEADER_LEN>() {
        let Ok(header) = RequestHeader::parse(head) else {
            return;
        };
        let _ = validate(&header, &limits);
        input = rest
            .get(header.payload_len() as usize..)
            .unwrap_or_default();
    }
}

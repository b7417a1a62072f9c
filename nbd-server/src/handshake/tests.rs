use super::*;

fn exports() -> Vec<ExportInfo> {
    vec![
        ExportInfo {
            name: "root".into(),
            description: "root.img".into(),
            size_bytes: 1 << 20,
            flags: 0x1,
        },
        ExportInfo {
            name: "data".into(),
            description: String::new(),
            size_bytes: 4096,
            flags: 0x3,
        },
    ]
}

/// Splits encoded option replies into (option, reply type, data).
fn replies(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        assert_eq!(&bytes[..8], &REPLY_MAGIC.to_be_bytes(), "reply magic");
        let option = u32::from_be_bytes(bytes[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(bytes[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
        out.push((option, kind, bytes[20..20 + len].to_vec()));
        bytes = &bytes[20 + len..];
    }
    out
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

const CLIENT: ClientFlags = ClientFlags {
    fixed_newstyle: true,
    no_zeroes: true,
};

fn negotiation() -> Negotiation {
    Negotiation::new(CLIENT, TlsOffer::None)
}

#[test]
fn greeting_is_magic_then_flags() {
    let g = greeting();
    assert_eq!(&g[..8], b"NBDMAGIC");
    assert_eq!(&g[8..16], b"IHAVEOPT");
    assert_eq!(&g[16..], &[0, 3]);
}

#[test]
fn client_flags_and_option_headers() {
    assert_eq!(
        parse_client_flags([0, 0, 0, 3]),
        Ok(ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true
        })
    );
    assert_eq!(
        parse_client_flags([0, 0, 0, 4]),
        Err(HandshakeError::UnknownClientFlags(4))
    );
    let mut h = [0u8; 16];
    h[..8].copy_from_slice(b"IHAVEOPT");
    h[8..12].copy_from_slice(&7u32.to_be_bytes());
    h[12..].copy_from_slice(&9u32.to_be_bytes());
    assert_eq!(parse_option_header(&h), Ok((7, 9)));
    h[0] = b'X';
    assert!(matches!(
        parse_option_header(&h),
        Err(HandshakeError::BadOptionMagic(_))
    ));
}

#[test]
fn go_sends_export_info_before_ack_and_enters_transmission() {
    let mut n = negotiation();
    let mut out = Vec::new();
    let outcome = n.handle(
        OPT_GO,
        &go_data("root", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]),
        &exports(),
        &mut out,
    );
    let r = replies(&out);
    let kinds: Vec<u32> = r.iter().map(|x| x.1).collect();
    assert_eq!(kinds, [REP_INFO, REP_INFO, REP_INFO, REP_INFO, REP_ACK]);
    // NBD_INFO_EXPORT first: size and flags (QEMU calls a server broken otherwise).
    assert_eq!(&r[0].2[..2], &INFO_EXPORT.to_be_bytes());
    assert_eq!(&r[0].2[2..10], &(1u64 << 20).to_be_bytes());
    // Block sizes: minimum 1, preferred 4 KiB, maximum payload 64 MiB.
    assert_eq!(&r[1].2, &[0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x04, 0, 0, 0]);
    assert_eq!(&r[2].2[2..], b"root");
    assert_eq!(&r[3].2[2..], b"root.img");
    let Outcome::Transmission(a) = outcome else {
        panic!("expected transmission, got {outcome:?}")
    };
    assert_eq!(a.export_index, 0);
    assert!(!a.structured_replies && !a.base_allocation);
    assert_eq!(a.flags & FLAG_SEND_DF, 0, "DF only with structured replies");
}

#[test]
fn info_does_not_enter_transmission_and_empty_name_is_default() {
    let mut out = Vec::new();
    let outcome = negotiation().handle(OPT_INFO, &go_data("", &[]), &exports(), &mut out);
    assert_eq!(outcome, Outcome::Continue);
    assert_eq!(replies(&out).last().unwrap().1, REP_ACK);
}

#[test]
fn unknown_export_gets_err_unknown_and_no_info() {
    let mut out = Vec::new();
    let outcome = negotiation().handle(OPT_GO, &go_data("nope", &[]), &exports(), &mut out);
    assert_eq!(outcome, Outcome::Continue);
    let r = replies(&out);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].1, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].2).contains("root, data"));
}

#[test]
fn malformed_go_is_err_invalid() {
    for data in [vec![0, 0, 0, 9, b'r'], {
        let mut d = go_data("root", &[1]);
        d.push(0);
        d
    }] {
        let mut out = Vec::new();
        negotiation().handle(OPT_GO, &data, &exports(), &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    }
}

#[test]
fn export_name_replies_without_padding_when_no_zeroes() {
    let mut out = Vec::new();
    let outcome = negotiation().handle(OPT_EXPORT_NAME, b"data", &exports(), &mut out);
    assert!(matches!(
        outcome,
        Outcome::Transmission(Agreement {
            export_index: 1,
            ..
        })
    ));
    assert_eq!(out.len(), 10);
    assert_eq!(&out[..8], &4096u64.to_be_bytes());
    let mut padded = Negotiation::new(
        ClientFlags {
            fixed_newstyle: true,
            no_zeroes: false,
        },
        TlsOffer::None,
    );
    out.clear();
    padded.handle(OPT_EXPORT_NAME, b"data", &exports(), &mut out);
    assert_eq!(out.len(), 134);
    out.clear();
    assert_eq!(
        negotiation().handle(OPT_EXPORT_NAME, b"zzz", &exports(), &mut out),
        Outcome::Close
    );
    assert!(out.is_empty());
}

#[test]
fn list_names_every_export() {
    let mut out = Vec::new();
    negotiation().handle(OPT_LIST, &[], &exports(), &mut out);
    let r = replies(&out);
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].1, REP_SERVER);
    assert_eq!(&r[0].2, &[&[0, 0, 0, 4][..], b"root", b"root.img"].concat());
    assert_eq!(&r[1].2, &[&[0, 0, 0, 4][..], b"data"].concat());
    assert_eq!(r[2].1, REP_ACK);
    out.clear();
    negotiation().handle(OPT_LIST, &[1], &exports(), &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
}

#[test]
fn unknown_options_are_unsupported_and_negotiation_goes_on() {
    let mut n = negotiation();
    for option in [4, 11, 999] {
        let mut out = Vec::new();
        assert_eq!(
            n.handle(option, &[], &exports(), &mut out),
            Outcome::Continue
        );
        assert_eq!(
            replies(&out)[0],
            (option, REP_ERR_UNSUP, replies(&out)[0].2.clone())
        );
    }
}

#[test]
fn abort_acks() {
    let mut out = Vec::new();
    assert_eq!(
        negotiation().handle(OPT_ABORT, &[], &exports(), &mut out),
        Outcome::Abort
    );
    assert_eq!(replies(&out), vec![(OPT_ABORT, REP_ACK, vec![])]);
}

#[test]
fn meta_context_needs_structured_replies_and_selects_base_allocation() {
    let mut n = negotiation();
    let mut out = Vec::new();
    n.handle(
        OPT_SET_META_CONTEXT,
        &meta_data("root", &["base:allocation"]),
        &exports(),
        &mut out,
    );
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);

    out.clear();
    n.handle(OPT_STRUCTURED_REPLY, &[], &exports(), &mut out);
    assert_eq!(replies(&out), vec![(OPT_STRUCTURED_REPLY, REP_ACK, vec![])]);

    out.clear();
    n.handle(
        OPT_LIST_META_CONTEXT,
        &meta_data("root", &[]),
        &exports(),
        &mut out,
    );
    let r = replies(&out);
    assert_eq!(r[0].1, REP_META_CONTEXT);
    assert_eq!(&r[0].2[4..], b"base:allocation");
    assert_eq!(r[1].1, REP_ACK);

    out.clear();
    n.handle(
        OPT_SET_META_CONTEXT,
        &meta_data("root", &["qemu:dirty-bitmap:x", "base:allocation"]),
        &exports(),
        &mut out,
    );
    let r = replies(&out);
    assert_eq!(r.len(), 2);
    assert_eq!(&r[0].2[..4], &META_BASE_ALLOCATION_ID.to_be_bytes());

    out.clear();
    let Outcome::Transmission(a) = n.handle(OPT_GO, &go_data("root", &[]), &exports(), &mut out)
    else {
        panic!()
    };
    assert!(a.structured_replies && a.base_allocation);
    assert_ne!(a.flags & FLAG_SEND_DF, 0);
}

#[test]
fn meta_context_for_another_export_does_not_allow_block_status() {
    let mut n = negotiation();
    let mut out = Vec::new();
    n.handle(OPT_STRUCTURED_REPLY, &[], &exports(), &mut out);
    n.handle(
        OPT_SET_META_CONTEXT,
        &meta_data("data", &["base:allocation"]),
        &exports(),
        &mut out,
    );
    let Outcome::Transmission(a) = n.handle(OPT_GO, &go_data("root", &[]), &exports(), &mut out)
    else {
        panic!()
    };
    assert!(!a.base_allocation);
}

#[test]
fn unknown_namespace_selects_nothing() {
    let mut n = negotiation();
    let mut out = Vec::new();
    n.handle(OPT_STRUCTURED_REPLY, &[], &exports(), &mut out);
    out.clear();
    n.handle(
        OPT_SET_META_CONTEXT,
        &meta_data("root", &["x-foo:bar"]),
        &exports(),
        &mut out,
    );
    assert_eq!(replies(&out), vec![(OPT_SET_META_CONTEXT, REP_ACK, vec![])]);
}

#[test]
fn too_big_option_is_refused() {
    let mut out = Vec::new();
    negotiation().too_big(OPT_GO, &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_TOO_BIG);
}

/// One option's outcome and reply types.
fn ask(n: &mut Negotiation, option: u32, data: &[u8]) -> (Outcome, Vec<u32>) {
    let mut out = Vec::new();
    let outcome = n.handle(option, data, &exports(), &mut out);
    let kinds = replies(&out).into_iter().map(|(o, kind, _)| {
        assert_eq!(o, option, "a reply names another option");
        kind
    });
    (outcome, kinds.collect())
}

#[test]
fn without_tls_starttls_is_refused_by_policy_and_nothing_needs_tls() {
    let mut n = negotiation();
    assert_eq!(
        ask(&mut n, OPT_STARTTLS, &[]),
        (Outcome::Continue, vec![REP_ERR_POLICY])
    );
    assert_eq!(
        ask(&mut n, OPT_LIST, &[]),
        (Outcome::Continue, vec![REP_SERVER, REP_SERVER, REP_ACK])
    );
    assert!(n.refused_for_tls().is_none());
}

#[test]
fn optional_tls_serves_plaintext_clients() {
    let mut n = Negotiation::new(CLIENT, TlsOffer::Optional);
    assert_eq!(
        ask(&mut n, OPT_STRUCTURED_REPLY, &[]),
        (Outcome::Continue, vec![REP_ACK])
    );
    let (outcome, kinds) = ask(&mut n, OPT_GO, &go_data("root", &[]));
    assert!(matches!(outcome, Outcome::Transmission(a) if a.structured_replies));
    assert_eq!(kinds, vec![REP_INFO, REP_INFO, REP_ACK]);
    assert!(!n.tls_running());
}

#[test]
fn starttls_is_acknowledged_and_forgets_what_was_negotiated_before() {
    let mut n = Negotiation::new(CLIENT, TlsOffer::Optional);
    ask(&mut n, OPT_STRUCTURED_REPLY, &[]);
    ask(
        &mut n,
        OPT_SET_META_CONTEXT,
        &meta_data("root", &["base:allocation"]),
    );
    let mut out = Vec::new();
    assert_eq!(
        n.handle(OPT_STARTTLS, &[], &exports(), &mut out),
        Outcome::StartTls
    );
    assert_eq!(replies(&out), vec![(OPT_STARTTLS, REP_ACK, vec![])]);
    n.tls_started();
    assert!(n.tls_running());
    // Structured replies and the meta context were negotiated in plaintext: gone.
    let (outcome, _) = ask(&mut n, OPT_GO, &go_data("root", &[]));
    let Outcome::Transmission(agreement) = outcome else {
        panic!("GO inside TLS: {outcome:?}");
    };
    assert!(!agreement.structured_replies && !agreement.base_allocation);
    assert_eq!(agreement.flags & FLAG_SEND_DF, 0);
}

/// STARTTLS acknowledged, and the handshake taken to have succeeded.
fn start_tls(n: &mut Negotiation) {
    assert_eq!(
        ask(n, OPT_STARTTLS, &[]),
        (Outcome::StartTls, vec![REP_ACK])
    );
    n.tls_started();
}

#[test]
fn starttls_twice_or_with_data_is_invalid() {
    let mut n = Negotiation::new(CLIENT, TlsOffer::Required);
    assert_eq!(
        ask(&mut n, OPT_STARTTLS, &[0]),
        (Outcome::Continue, vec![REP_ERR_INVALID])
    );
    start_tls(&mut n);
    assert_eq!(
        ask(&mut n, OPT_STARTTLS, &[]),
        (Outcome::Continue, vec![REP_ERR_INVALID])
    );
}

#[test]
fn required_tls_refuses_every_option_but_starttls_and_abort_until_tls_runs() {
    let mut n = Negotiation::new(CLIENT, TlsOffer::Required);
    for (option, data) in [
        (OPT_GO, go_data("root", &[])),
        (OPT_INFO, go_data("root", &[])),
        (OPT_INFO, go_data("nonexistent", &[])),
        (OPT_LIST, vec![]),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_LIST_META_CONTEXT, meta_data("root", &[])),
        (
            OPT_SET_META_CONTEXT,
            meta_data("root", &["base:allocation"]),
        ),
        (999, vec![]),
    ] {
        assert_eq!(
            ask(&mut n, option, &data),
            (Outcome::Continue, vec![REP_ERR_TLS_REQD]),
            "{}",
            option_name(option)
        );
    }
    let mut out = Vec::new();
    n.too_big(OPT_GO, &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_TLS_REQD);
    assert_eq!(
        n.refused_for_tls(),
        Some(OPT_GO),
        "the first refused option"
    );
    assert_eq!(ask(&mut n, OPT_ABORT, &[]), (Outcome::Abort, vec![REP_ACK]));
}

#[test]
fn required_tls_closes_on_export_name_before_tls() {
    let mut n = Negotiation::new(CLIENT, TlsOffer::Required);
    assert_eq!(
        ask(&mut n, OPT_EXPORT_NAME, b"root"),
        (Outcome::Close, vec![])
    );
    assert_eq!(n.refused_for_tls(), Some(OPT_EXPORT_NAME));
}

#[test]
fn required_tls_serves_everything_inside_tls_and_never_says_tls_required() {
    let mut n = Negotiation::new(CLIENT, TlsOffer::Required);
    start_tls(&mut n);
    assert_eq!(
        ask(&mut n, OPT_LIST, &[]),
        (Outcome::Continue, vec![REP_SERVER, REP_SERVER, REP_ACK])
    );
    assert_eq!(
        ask(&mut n, OPT_STRUCTURED_REPLY, &[]),
        (Outcome::Continue, vec![REP_ACK])
    );
    let mut out = Vec::new();
    n.too_big(OPT_GO, &mut out);
    assert_eq!(replies(&out)[0].1, REP_ERR_TOO_BIG);
    let (outcome, _) = ask(&mut n, OPT_GO, &go_data("data", &[]));
    assert!(
        matches!(outcome, Outcome::Transmission(a) if a.export_index == 1 && a.structured_replies)
    );
    assert!(n.refused_for_tls().is_none());
}

#[test]
fn required_tls_lets_an_oversized_starttls_be_too_big() {
    let mut n = Negotiation::new(CLIENT, TlsOffer::Required);
    let mut out = Vec::new();
    assert_eq!(n.too_big(OPT_STARTTLS, &mut out), Outcome::Continue);
    assert_eq!(replies(&out)[0].1, REP_ERR_TOO_BIG);
    assert!(!n.tls_running());
}

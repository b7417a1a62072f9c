use super::*;
use proptest::prelude::*;

const ALL_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_SEND_DF
    | FLAG_CAN_MULTI_CONN
    | FLAG_SEND_CACHE
    | FLAG_SEND_FAST_ZERO;

fn limits() -> Limits {
    Limits {
        size_bytes: 1 << 20,
        flags: ALL_FLAGS,
        structured_replies: true,
        base_allocation: true,
    }
}

fn header(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags,
        kind,
        cookie: 42,
        offset,
        length,
    }
}

#[test]
fn header_round_trips_and_bad_magic_is_caught() {
    let h = header(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
    let bytes = h.encode();
    assert_eq!(&bytes[..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(RequestHeader::parse(&bytes), Ok(h));
    let mut bad = bytes;
    bad[0] = 0;
    assert_eq!(RequestHeader::parse(&bad), Err(BadMagic(0x00609513)));
}

#[test]
fn valid_requests_become_commands() {
    let l = limits();
    assert_eq!(
        validate(&header(CMD_READ, CMD_FLAG_DF, 0, 4096), &l),
        Ok(Command::Read {
            offset: 0,
            length: 4096,
            df: true
        })
    );
    assert_eq!(
        validate(
            &header(
                CMD_WRITE_ZEROES,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                512,
                512
            ),
            &l
        ),
        Ok(Command::WriteZeroes {
            offset: 512,
            length: 512,
            fua: false,
            no_hole: true,
            fast: true
        })
    );
    assert_eq!(
        validate(&header(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &l),
        Ok(Command::Flush)
    );
    assert_eq!(
        validate(&header(CMD_DISC, 0, 0, 0), &l),
        Ok(Command::Disconnect)
    );
    assert_eq!(
        validate(&header(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20), &l),
        Ok(Command::BlockStatus {
            offset: 0,
            length: 1 << 20,
            req_one: true
        })
    );
    // A read that ends exactly at the end of the export.
    assert!(validate(&header(CMD_READ, 0, (1 << 20) - 1, 1), &l).is_ok());
}

#[test]
fn refusals_carry_the_spec_error() {
    let l = limits();
    let cases = [
        (header(99, 0, 0, 0), Errno::Inval),
        (header(CMD_READ, 1 << 9, 0, 1), Errno::Inval),
        (header(CMD_WRITE, CMD_FLAG_DF, 0, 1), Errno::Inval),
        (header(CMD_READ, 0, 1 << 20, 1), Errno::Inval),
        (header(CMD_READ, 0, u64::MAX, 2), Errno::Inval),
        (header(CMD_TRIM, 0, 1 << 20, 1), Errno::Inval),
        (header(CMD_WRITE, 0, (1 << 20) - 1, 2), Errno::NoSpc),
        (header(CMD_WRITE_ZEROES, 0, 1 << 21, 1), Errno::NoSpc),
        (header(CMD_WRITE, 0, 0, MAX_PAYLOAD_BYTES + 1), Errno::Inval),
        (header(CMD_BLOCK_STATUS, 0, 0, 0), Errno::Inval),
    ];
    for (h, errno) in cases {
        let err = validate(&h, &l).expect_err("must be refused");
        assert_eq!(err.errno(), errno, "{h:?}: {err}");
    }
}

#[test]
fn read_only_and_unnegotiated_features_are_refused() {
    let ro = Limits {
        flags: ALL_FLAGS | FLAG_READ_ONLY,
        ..limits()
    };
    assert_eq!(
        validate(&header(CMD_WRITE, 0, 0, 1), &ro),
        Err(RequestError::ReadOnly)
    );
    assert_eq!(
        validate(&header(CMD_TRIM, 0, 0, 1), &ro).map_err(|e| e.errno()),
        Err(Errno::Perm)
    );
    let plain = Limits {
        flags: FLAG_HAS_FLAGS,
        structured_replies: false,
        base_allocation: false,
        ..limits()
    };
    for h in [
        header(CMD_FLUSH, 0, 0, 0),
        header(CMD_TRIM, 0, 0, 1),
        header(CMD_WRITE_ZEROES, 0, 0, 1),
        header(CMD_CACHE, 0, 0, 1),
        header(CMD_BLOCK_STATUS, 0, 0, 1),
        header(CMD_READ, CMD_FLAG_DF, 0, 1),
        header(CMD_WRITE, CMD_FLAG_FUA, 0, 1),
    ] {
        assert!(
            matches!(
                validate(&h, &plain),
                Err(RequestError::NotNegotiated { .. })
            ),
            "{h:?}"
        );
    }
    let no_fast = Limits {
        flags: ALL_FLAGS & !FLAG_SEND_FAST_ZERO,
        ..limits()
    };
    assert!(validate(
        &header(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1),
        &no_fast
    )
    .is_err());
}

#[test]
fn payload_len_is_only_for_writes() {
    assert_eq!(header(CMD_WRITE, 0, 0, 77).payload_len(), 77);
    assert_eq!(header(CMD_READ, 0, 0, 77).payload_len(), 0);
    assert_eq!(header(99, 0, 0, 77).payload_len(), 0);
}

/// A reference of the rules in plain terms, for the property test.
fn expected_ok(h: &RequestHeader, l: &Limits) -> bool {
    let known = matches!(h.kind, 0..=7);
    let flags_ok = h.flags & !0x1f == 0
        && (h.flags & CMD_FLAG_DF == 0 || h.kind == CMD_READ)
        && (h.flags & (CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO) == 0 || h.kind == CMD_WRITE_ZEROES)
        && (h.flags & CMD_FLAG_REQ_ONE == 0 || h.kind == CMD_BLOCK_STATUS);
    let end = h.offset as u128 + h.length as u128;
    let range_ok = matches!(h.kind, CMD_DISC | CMD_FLUSH) || end <= l.size_bytes as u128;
    let len_ok = !matches!(h.kind, CMD_READ | CMD_WRITE) || h.length <= MAX_PAYLOAD_BYTES;
    let bs_ok = h.kind != CMD_BLOCK_STATUS || h.length > 0;
    known && flags_ok && range_ok && len_ok && bs_ok
}

proptest! {
    #[test]
    fn validation_matches_the_reference(
        kind in 0u16..10,
        flags in prop_oneof![Just(0u16), 0u16..0x40, any::<u16>()],
        offset in prop_oneof![0u64..(2 << 20), any::<u64>(), Just(u64::MAX - 1)],
        length in prop_oneof![0u32..(2 << 20), any::<u32>()],
    ) {
        let h = header(kind, flags, offset, length);
        let l = limits();
        let got = validate(&h, &l);
        prop_assert_eq!(got.is_ok(), expected_ok(&h, &l), "{:?} -> {:?}", h, got);
        if let Ok(cmd) = got {
            // Everything accepted is in range, so backends never see a bad offset.
            let (o, n) = match cmd {
                Command::Read { offset, length, .. } | Command::Write { offset, length, .. }
                | Command::Trim { offset, length, .. } | Command::Cache { offset, length }
                | Command::WriteZeroes { offset, length, .. } | Command::BlockStatus { offset, length, .. } => (offset, length),
                Command::Flush | Command::Disconnect => (0, 0),
            };
            prop_assert!(o.checked_add(u64::from(n)).is_some_and(|e| e <= l.size_bytes));
        }
    }
}

//! Round trips and malformed frames of the codec.

use super::*;

const LIMITS: FrameLimits = FrameLimits {
    max_chunk: 4 << 20,
    max_control: 64 << 10,
};

fn encode(id: u32, msg: &Message) -> Vec<u8> {
    let (h, b) = encode_frame(id, msg, &LIMITS).unwrap();
    [&h[..], &b[..]].concat()
}

#[test]
fn every_message_round_trips() {
    let mut map = HaveMap::new(13);
    map.set_present(0, true);
    map.set_present(12, true);
    map.set_in_flight(5, true);
    map.set_present(99, true); // out of range: ignored
    assert!(map.is_present(12) && !map.is_present(11) && map.is_in_flight(5));
    let msgs = [
        Message::GetChunk {
            digest: Digest::of(b"a"),
        },
        Message::Have {
            blob: Digest::of(b"b"),
        },
        Message::Subscribe {
            blob: Digest::of(b"s"),
        },
        Message::Chunk(Bytes::from_static(b"chunk bytes")),
        Message::Chunk(Bytes::new()),
        Message::NotFound,
        Message::HaveMap(map),
        Message::HaveMap(HaveMap::new(0)),
        Message::Unknown,
        Message::GetPieces {
            chunk: Digest::of(b"c"),
            first: 3,
            count: 2,
        },
        Message::Pieces(Bytes::from_static(b"two pieces")),
        Message::GetWindow {
            layer: Digest::of(b"l"),
            sha256: Digest::of(b"w"),
            offset: 1 << 40,
            len: 17_000,
        },
        Message::GetIndexMain(PartAsk {
            layer: Digest::of(b"l"),
            sha256: Digest::of(b"m"),
            len: 300_000,
            repo: "library/python".into(),
            ns: Some("docker.io".into()),
        }),
        Message::GetIndexMain(PartAsk {
            layer: Digest::of(b"l"),
            sha256: Digest::of(b"m"),
            len: 1,
            repo: "r".into(),
            ns: None,
        }),
        Message::GetChunkList(PartAsk {
            layer: Digest::of(b"l"),
            sha256: Digest::of(b"c"),
            len: 140_000,
            repo: "library/python".into(),
            ns: None,
        }),
        Message::Pending,
        Message::Error("no such thing".into()),
    ];
    for (i, msg) in msgs.iter().enumerate() {
        let bytes = encode(i as u32 + 7, msg);
        let (id, got, used) = decode_frame(&bytes, &LIMITS).unwrap().unwrap();
        assert_eq!((id, &got, used), (i as u32 + 7, msg, bytes.len()));
        // Every strict prefix is incomplete, not an error.
        for cut in 0..bytes.len() {
            assert_eq!(decode_frame(&bytes[..cut], &LIMITS), Ok(None));
        }
    }
}

#[test]
fn oversized_and_malformed_frames_are_rejected_from_the_header() {
    let huge = encode_header(kind::CHUNK, 1, (4 << 20) + 1);
    assert!(matches!(
        decode_frame(&huge, &LIMITS),
        Err(WireError::Oversized { .. })
    ));
    let big_map = encode_header(kind::HAVE_MAP, 1, u32::MAX);
    assert!(matches!(
        decode_frame(&big_map, &LIMITS),
        Err(WireError::Oversized { .. })
    ));
    let short = encode_header(kind::GET_CHUNK, 1, 31);
    assert!(matches!(
        decode_frame(&short, &LIMITS),
        Err(WireError::BadLength { .. })
    ));
    let unknown = encode_header(0x42, 1, 0);
    assert_eq!(
        decode_frame(&unknown, &LIMITS),
        Err(WireError::UnknownKind(0x42))
    );
    // A have-map whose bitmaps disagree with its count, or with padding bits set.
    let mut bad = encode_header(kind::HAVE_MAP, 1, 6).to_vec();
    bad.extend_from_slice(&[0, 0, 0, 9, 0, 0]);
    assert!(decode_frame(&bad, &LIMITS).is_err());
    let mut pad = encode_header(kind::HAVE_MAP, 1, 6).to_vec();
    pad.extend_from_slice(&[0, 0, 0, 3, 0b1000, 0]);
    assert!(decode_frame(&pad, &LIMITS).is_err());
    // A have-map too big to encode within the control limit.
    let too_big = Message::HaveMap(HaveMap::new(1 << 20));
    assert!(encode_frame(1, &too_big, &LIMITS).is_err());
}

#[test]
fn random_bytes_never_panic() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 256];
    for round in 0..20_000 {
        for b in buf.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        // Make small valid-looking lengths and kinds common.
        buf[0..3].fill(0);
        buf[4] = [0x01, 0x02, 0x81, 0x82, 0x83, 0x84, 0xee][round % 7];
        let len = (state >> 8) as usize % buf.len();
        let _ = decode_frame(&buf[..len], &LIMITS);
    }
}

#[test]
fn a_piece_request_for_no_pieces_or_of_the_wrong_length_is_refused() {
    let zero = Message::GetPieces {
        chunk: Digest::of(b"c"),
        first: 0,
        count: 0,
    };
    let bytes = encode(1, &zero);
    assert!(matches!(
        decode_frame(&bytes, &LIMITS),
        Err(WireError::Malformed {
            kind: "GetPieces",
            ..
        })
    ));
    let short = encode_header(kind::GET_PIECES, 1, 36);
    assert!(matches!(
        decode_header(&short, &LIMITS),
        Err(WireError::BadLength { expected: 40, .. })
    ));
    let pending = encode_header(kind::PENDING, 1, 1);
    assert!(
        decode_header(&pending, &LIMITS).is_err(),
        "Pending has no body"
    );
}

#[test]
fn a_window_request_for_no_bytes_or_of_the_wrong_length_is_refused() {
    let empty = Message::GetWindow {
        layer: Digest::of(b"l"),
        sha256: Digest::of(b"w"),
        offset: 0,
        len: 0,
    };
    assert!(matches!(
        decode_frame(&encode(1, &empty), &LIMITS),
        Err(WireError::Malformed {
            kind: "GetWindow",
            ..
        })
    ));
    let short = encode_header(kind::GET_WINDOW, 1, 72);
    assert!(matches!(
        decode_header(&short, &LIMITS),
        Err(WireError::BadLength { expected: 76, .. })
    ));
}

#[test]
fn an_index_main_request_that_is_empty_cut_short_too_long_or_padded_is_refused() {
    let ask = |len: u32, repo: &str| {
        Message::GetIndexMain(PartAsk {
            layer: Digest::of(b"l"),
            sha256: Digest::of(b"m"),
            len,
            repo: repo.into(),
            ns: None,
        })
    };
    let malformed = |bytes: &[u8]| {
        matches!(
            decode_frame(bytes, &LIMITS),
            Err(WireError::Malformed {
                kind: "GetIndexMain",
                ..
            })
        )
    };
    assert!(malformed(&encode(1, &ask(0, "r"))), "no bytes asked");
    assert!(malformed(&encode(1, &ask(5, ""))), "no repository");
    // One byte more than the namespace's length says, fixed up in the header.
    let mut padded = encode(1, &ask(5, "r"));
    padded.push(0);
    let len = (padded.len() - HEADER_LEN) as u32;
    padded[..4].copy_from_slice(&len.to_be_bytes());
    assert!(malformed(&padded), "bytes after the namespace");
    // The repository's length says more than the body holds.
    let mut cut = encode(1, &ask(5, "repo"));
    cut.truncate(cut.len() - 3);
    let len = (cut.len() - HEADER_LEN) as u32;
    cut[..4].copy_from_slice(&len.to_be_bytes());
    assert!(malformed(&cut), "cut inside the repository");
    let long = "r".repeat(MAX_REPO_NAME + 1);
    assert!(encode_frame(1, &ask(5, &long), &LIMITS).is_err());
    let huge = encode_header(kind::GET_INDEX_MAIN, 1, 4096);
    assert!(matches!(
        decode_header(&huge, &LIMITS),
        Err(WireError::Oversized { .. })
    ));
}

//! Tests of the streaming webdataset reader on generated, hand-corrupted and demo shards.

use std::io::{self, Read};
use std::path::PathBuf;

use dfndr_shards::wds::{
    member_key_ext, RawSample, ReaderLimits, ShardError, Skip, SkipReason, WdsEvent, WdsReader,
    MAX_HEADER_BYTES,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// helpers

/// A tar with the given (name, data) members and proper end-of-archive blocks.
fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// The same tar without the two end-of-archive blocks.
fn without_end(mut tar: Vec<u8>) -> Vec<u8> {
    assert!(tar[tar.len() - 1024..].iter().all(|&b| b == 0));
    tar.truncate(tar.len() - 1024);
    tar
}

/// (name, header offset, data offset, size) of every member, as the tar crate sees them.
fn layout(tar: &[u8]) -> Vec<(String, u64, u64, u64)> {
    let mut ar = tar::Archive::new(tar);
    ar.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                e.raw_header_position(),
                e.raw_file_position(),
                e.size(),
            )
        })
        .collect()
}

fn header_of(tar: &[u8], name: &str) -> usize {
    layout(tar)
        .into_iter()
        .find(|m| m.0 == name)
        .unwrap_or_else(|| panic!("no member {name}"))
        .1 as usize
}

fn data_of(tar: &[u8], name: &str) -> usize {
    layout(tar).into_iter().find(|m| m.0 == name).unwrap().2 as usize
}

/// All events up to the first error, and that error.
fn read_with<R: Read>(r: R, limits: ReaderLimits) -> (Vec<WdsEvent>, Option<ShardError>) {
    let mut it = WdsReader::new(r, limits);
    let mut events = Vec::new();
    let mut err = None;
    for item in it.by_ref() {
        match item {
            Ok(e) => events.push(e),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    // After an error (or the end) the iterator stays finished.
    assert!(it.next().is_none());
    assert!(it.next().is_none());
    (events, err)
}

fn read(bytes: &[u8]) -> (Vec<WdsEvent>, Option<ShardError>) {
    read_with(bytes, ReaderLimits::default())
}

fn read_ok(bytes: &[u8]) -> Vec<WdsEvent> {
    let (events, err) = read(bytes);
    assert!(err.is_none(), "unexpected error {err:?}");
    events
}

fn sample(e: &WdsEvent) -> &RawSample {
    match e {
        WdsEvent::Sample(s) => s,
        WdsEvent::Skip(s) => panic!("expected a sample, got skip {s:?}"),
    }
}

fn skip(e: &WdsEvent) -> &Skip {
    match e {
        WdsEvent::Skip(s) => s,
        WdsEvent::Sample(s) => panic!("expected a skip, got sample {}", s.key),
    }
}

/// A summary that is easy to compare: ("key", "sample") or ("key", reason).
fn outline(events: &[WdsEvent]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| match e {
            WdsEvent::Sample(s) => (s.key.clone(), "sample".to_owned()),
            WdsEvent::Skip(s) => (s.key.clone(), s.reason.as_str().to_owned()),
        })
        .collect()
}

fn ol(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(k, r)| (k.to_string(), r.to_string()))
        .collect()
}

/// Three complete samples a, b, c with image, caption and json.
fn abc() -> Vec<u8> {
    tar_of(&[
        ("a.jpg", &[1u8; 700]),
        ("a.txt", b"caption a"),
        ("a.json", br#"{"url":"http://a"}"#),
        ("b.jpg", &[2u8; 1300]),
        ("b.txt", b"caption b"),
        ("b.json", br#"{"url":"http://b"}"#),
        ("c.jpg", &[3u8; 20]),
        ("c.txt", b"caption c"),
        ("c.json", br#"{"url":"http://c"}"#),
    ])
}

/// A reader that hands out 1-7 bytes per call and, if asked, an `Interrupted` error now and then.
struct Chunky<R> {
    inner: R,
    state: u64,
    interrupt: bool,
}

impl<R> Chunky<R> {
    fn new(inner: R, interrupt: bool) -> Self {
        Self {
            inner,
            state: 0x9e37_79b9_7f4a_7c15,
            interrupt,
        }
    }
}

impl<R: Read> Read for Chunky<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        if self.interrupt && self.state.is_multiple_of(5) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "signal"));
        }
        let n = 1 + (self.state % 7) as usize;
        let n = n.min(buf.len());
        self.inner.read(&mut buf[..n])
    }
}

fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/demo")
}

// ---------------------------------------------------------------------------------------------
// good input

#[test]
fn reads_a_simple_shard() {
    let events = read_ok(&abc());
    assert_eq!(
        outline(&events),
        ol(&[("a", "sample"), ("b", "sample"), ("c", "sample")])
    );
    let b = sample(&events[1]);
    assert_eq!(b.image, vec![2u8; 1300]);
    assert_eq!(b.image_ext, "jpg");
    assert_eq!(b.caption, "caption b");
    assert_eq!(b.url.as_deref(), Some("http://b"));
    assert_eq!(b.meta.as_deref(), Some(&br#"{"url":"http://b"}"#[..]));
}

#[test]
fn demo_shards_have_25_valid_samples() {
    let mut total = 0;
    let mut counts = Vec::new();
    for name in ["demo-00000.tar", "demo-00001.tar"] {
        let bytes = std::fs::read(demo_dir().join(name)).unwrap();
        let events = read_ok(&bytes);
        for e in &events {
            let s = sample(e);
            assert!(!s.image.is_empty() && !s.caption.is_empty());
            assert!(["jpg", "png", "webp"].contains(&s.image_ext.as_str()));
            assert!(s.meta.is_some());
        }
        // Tiny reads with interruptions give exactly the same events.
        let (chunked, err) = read_with(Chunky::new(&bytes[..], true), ReaderLimits::default());
        assert!(err.is_none());
        assert_eq!(chunked, events);
        counts.push(events.len());
        total += events.len();
    }
    assert_eq!(counts, vec![13, 12]);
    assert_eq!(total, 25);
}

#[test]
fn all_image_extensions_case_insensitive() {
    let tar = tar_of(&[
        ("a.jpg", b"A"),
        ("a.txt", b"a"),
        ("b.JPEG", b"B"),
        ("b.txt", b"b"),
        ("c.png", b"C"),
        ("c.TXT", b"c"),
        ("d.webp", b"D"),
        ("d.txt", b"d"),
        ("e.gif", b"E"),
        ("e.txt", b"e"),
    ]);
    let events = read_ok(&tar);
    let exts: Vec<&str> = events
        .iter()
        .map(|e| sample(e).image_ext.as_str())
        .collect();
    assert_eq!(exts, vec!["jpg", "jpeg", "png", "webp", "gif"]);
}

#[test]
fn member_order_inside_a_group_does_not_matter_and_json_is_optional() {
    let tar = tar_of(&[
        ("a.json", br#"{"url":"u"}"#),
        ("a.txt", b"  padded caption \n"),
        ("a.png", b"PNG"),
        ("b.txt", b"no json here"),
        ("b.webp", b"WEBP"),
    ]);
    let events = read_ok(&tar);
    let a = sample(&events[0]);
    assert_eq!(a.caption, "padded caption");
    assert_eq!(a.url.as_deref(), Some("u"));
    let b = sample(&events[1]);
    assert_eq!(b.url, None);
    assert_eq!(b.meta, None);
}

#[test]
fn directory_prefixed_and_long_keys() {
    let long_dir = "d".repeat(150);
    let long = format!("{long_dir}/00042");
    let jpg = format!("{long}.jpg");
    let txt = format!("{long}.txt");
    let tar = tar_of(&[
        ("part/0001.jpg", b"x"),
        ("part/0001.txt", b"t"),
        ("other.dir/0001.jpg", b"y"),
        ("other.dir/0001.txt", b"u"),
        (&jpg, b"z"),
        (&txt, b"long"),
    ]);
    let events = read_ok(&tar);
    let keys: Vec<&str> = events.iter().map(|e| sample(e).key.as_str()).collect();
    assert_eq!(keys, vec!["part/0001", "other.dir/0001", long.as_str()]);
}

#[test]
fn pax_path_is_honoured() {
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("path", &b"pax/key1.jpg"[..])])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(3);
    h.set_mode(0o644);
    b.append_data(&mut h, "ignored-name.bin", &b"IMG"[..])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_size(4);
    h.set_mode(0o644);
    b.append_data(&mut h, "pax/key1.txt", &b"text"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let events = read_ok(&tar);
    assert_eq!(events.len(), 1);
    let s = sample(&events[0]);
    assert_eq!(s.key, "pax/key1");
    assert_eq!(s.image, b"IMG");
}

#[test]
fn non_regular_and_unnamed_members_are_ignored_without_splitting_groups() {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8], ty: tar::EntryType| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(ty);
        if ty == tar::EntryType::Symlink {
            h.set_link_name("a.jpg").unwrap();
        }
        b.append_data(&mut h, name, data).unwrap();
    };
    let file = tar::EntryType::Regular;
    add("a.jpg", b"img", file);
    add("._a.jpg", b"appledouble", file);
    add(".hidden", b"h", file);
    add("noext", b"n", file);
    add("dir.d/", b"", tar::EntryType::Directory);
    add("z.jpg", b"", tar::EntryType::Symlink);
    add("a.txt", b"cap", file);
    add("a.cls", b"7", file);
    add("a.syn.json", b"{}", file);
    add("b.jpg", b"img", file);
    add("b.txt", b"cap", file);
    add("q.cls", b"only unknown", file);
    let tar = b.into_inner().unwrap();
    let events = read_ok(&tar);
    assert_eq!(
        outline(&events),
        ol(&[("a", "sample"), ("b", "sample"), ("q", "no_image")])
    );
    assert_eq!(sample(&events[0]).meta, None);
}

#[test]
fn archive_without_end_blocks_is_accepted() {
    let events = read_ok(&without_end(abc()));
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| matches!(e, WdsEvent::Sample(_))));
}

#[test]
fn valid_empty_archive_has_no_samples() {
    assert!(read_ok(&[0u8; 10240]).is_empty());
    assert!(read_ok(&tar_of(&[])).is_empty());
    // Zero padding that is not a whole block after the end marker is fine too.
    let mut t = abc();
    t.extend_from_slice(&[0u8; 100]);
    assert_eq!(read_ok(&t).len(), 3);
}

fn arb_caption() -> impl Strategy<Value = String> {
    // Unicode words with surrounding whitespace that the reader must trim.
    (
        "[ \t\n]{0,2}",
        "[a-zA-Z0-9éüß漢字😀 ,.!?-]{0,40}[a-zA-Z漢😀]",
        "[ \t\n]{0,2}",
    )
        .prop_map(|(a, b, c)| format!("{a}{b}{c}"))
}

#[derive(Debug, Clone)]
struct Gen {
    dir: Option<String>,
    ext: &'static str,
    image: Vec<u8>,
    caption: String,
    url: Option<String>,
    json_first: bool,
}

fn arb_sample() -> impl Strategy<Value = Gen> {
    (
        proptest::option::of("[a-z]{1,8}(/[a-z0-9]{1,5})?"),
        prop::sample::select(vec!["jpg", "jpeg", "png", "webp", "gif", "JPG"]),
        prop::collection::vec(any::<u8>(), 1..1500),
        arb_caption(),
        proptest::option::of(proptest::option::of(
            "https://[a-z]{1,10}\\.com/[a-zé]{0,10}",
        )),
        any::<bool>(),
    )
        .prop_map(|(dir, ext, image, caption, url, json_first)| Gen {
            dir,
            ext,
            image,
            caption,
            // Outer None: no json member at all; inner None: json without a url.
            url: url.flatten(),
            json_first,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn generated_shards_round_trip(samples in prop::collection::vec(arb_sample(), 0..12), with_json in prop::collection::vec(any::<bool>(), 12)) {
        let mut members: Vec<(String, Vec<u8>)> = Vec::new();
        let mut expected = Vec::new();
        for (i, g) in samples.iter().enumerate() {
            let key = match &g.dir {
                Some(d) => format!("{d}/{i:06}"),
                None => format!("{i:06}"),
            };
            let json = with_json[i].then(|| match &g.url {
                Some(u) => serde_json::json!({"url": u, "caption": g.caption, "width": 3}).to_string(),
                None => serde_json::json!({"status": "success"}).to_string(),
            });
            if g.json_first {
                if let Some(j) = &json { members.push((format!("{key}.json"), j.clone().into_bytes())); }
            }
            members.push((format!("{key}.{}", g.ext), g.image.clone()));
            members.push((format!("{key}.txt"), g.caption.clone().into_bytes()));
            if !g.json_first {
                if let Some(j) = &json { members.push((format!("{key}.json"), j.clone().into_bytes())); }
            }
            expected.push(RawSample {
                key,
                image: g.image.clone(),
                image_ext: g.ext.to_ascii_lowercase(),
                caption: g.caption.trim().to_owned(),
                url: if json.is_some() { g.url.clone() } else { None },
                meta: json.map(String::into_bytes),
                extras: Vec::new(),
            });
        }
        let refs: Vec<(&str, &[u8])> = members.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        let tar = tar_of(&refs);
        let (events, err) = read(&tar);
        prop_assert!(err.is_none());
        let got: Vec<RawSample> = events.iter().map(|e| sample(e).clone()).collect();
        prop_assert_eq!(&got, &expected);
        let (chunked, err) = read_with(Chunky::new(&tar[..], false), ReaderLimits::default());
        prop_assert!(err.is_none());
        prop_assert_eq!(chunked, events);
    }
}

// ---------------------------------------------------------------------------------------------
// counted skips

#[test]
fn missing_caption_and_missing_image() {
    let tar = tar_of(&[
        ("a.jpg", b"A"),
        ("a.txt", b"a"),
        ("b.jpg", b"B"),
        ("b.json", b"{}"),
        ("c.jpg", b"C"),
        ("c.txt", b"c"),
        ("d.txt", b"caption without image"),
        ("d.json", b"{}"),
        ("e.jpg", b"E"),
        ("e.txt", b"e"),
    ]);
    let events = read_ok(&tar);
    assert_eq!(
        outline(&events),
        ol(&[
            ("a", "sample"),
            ("b", "no_caption"),
            ("c", "sample"),
            ("d", "no_image"),
            ("e", "sample")
        ])
    );
}

#[test]
fn empty_image_is_its_own_reason() {
    let tar = tar_of(&[
        ("a.jpg", b""),
        ("a.txt", b"a"),
        ("b.jpg", b"B"),
        ("b.txt", b"b"),
    ]);
    let events = read_ok(&tar);
    assert_eq!(
        outline(&events),
        ol(&[("a", "empty_image"), ("b", "sample")])
    );
    assert!(skip(&events[0]).detail.contains("a.jpg"));
}

#[test]
fn bad_captions() {
    let tar = tar_of(&[
        ("a.jpg", b"A"),
        ("a.txt", b"caf\xe9 latin-1"),
        ("b.jpg", b"B"),
        ("b.txt", b" \t\r\n \xc2\xa0 "),
        ("c.jpg", b"C"),
        ("c.txt", b""),
        ("d.jpg", b"D"),
        ("d.txt", "  ünïcødé ✓ 日本 \n".as_bytes()),
    ]);
    let events = read_ok(&tar);
    assert_eq!(
        outline(&events),
        ol(&[
            ("a", "invalid_caption"),
            ("b", "no_caption"),
            ("c", "no_caption"),
            ("d", "sample")
        ])
    );
    assert_eq!(sample(&events[3]).caption, "ünïcødé ✓ 日本");
}

#[test]
fn invalid_json_keeps_the_sample() {
    let tar = tar_of(&[
        ("a.jpg", b"A"),
        ("a.txt", b"a"),
        ("a.json", b"{\"url\": broken"),
        ("b.jpg", b"B"),
        ("b.txt", b"b"),
        ("b.json", br#"{"url": null}"#),
    ]);
    let events = read_ok(&tar);
    let a = sample(&events[0]);
    assert_eq!(a.url, None);
    assert_eq!(a.meta.as_deref(), Some(&b"{\"url\": broken"[..]));
    assert_eq!(sample(&events[1]).url, None);
}

#[test]
fn key_seen_again_later_is_a_duplicate() {
    let tar = tar_of(&[
        ("a.jpg", b"A1"),
        ("a.txt", b"first"),
        ("b.jpg", b"B"),
        ("b.txt", b"b"),
        ("a.jpg", b"A2"),
        ("a.txt", b"second"),
        ("c.jpg", b"C"),
        ("c.txt", b"c"),
    ]);
    let events = read_ok(&tar);
    assert_eq!(
        outline(&events),
        ol(&[
            ("a", "sample"),
            ("b", "sample"),
            ("a", "duplicate_key"),
            ("c", "sample")
        ])
    );
    assert_eq!(sample(&events[0]).caption, "first");
}

#[test]
fn two_members_of_one_kind_in_a_group_are_duplicates() {
    let tar = tar_of(&[
        ("a.jpg", b"A"),
        ("a.png", b"P"),
        ("a.txt", b"a"),
        ("b.jpg", b"B"),
        ("b.txt", b"b"),
        ("c.jpg", b"C"),
        ("c.jpg", b"C again"),
        ("c.txt", b"c"),
        ("d.jpg", b"D"),
        ("d.txt", b"d"),
        ("d.txt", b"d2"),
        ("e.jpg", b"E"),
        ("e.txt", b"e"),
        ("e.json", b"{}"),
        ("e.json", b"{}"),
        ("f.jpg", b"F"),
        ("f.txt", b"f"),
    ]);
    let events = read_ok(&tar);
    assert_eq!(
        outline(&events),
        ol(&[
            ("a", "duplicate_key"),
            ("b", "sample"),
            ("c", "duplicate_key"),
            ("d", "duplicate_key"),
            ("e", "duplicate_key"),
            ("f", "sample")
        ])
    );
    let detail = &skip(&events[0]).detail;
    assert!(
        detail.contains("a.jpg") && detail.contains("a.png"),
        "{detail}"
    );
}

#[test]
fn members_above_the_limit() {
    let big = [9u8; 200];
    let tar = tar_of(&[
        ("a.jpg", b"A"),
        ("a.txt", b"a"),
        ("b.jpg", &big),
        ("b.txt", b"b"),
        ("c.jpg", b"C"),
        ("c.txt", &big),
        ("d.jpg", b"D"),
        ("d.txt", b"d"),
        ("d.json", &big),
        ("e.jpg", b"E"),
        ("e.txt", b"e"),
        ("e.npz", &big),
        ("f.jpg", &[1u8; 100]),
        ("f.txt", b"exactly at the limit is fine"),
    ]);
    let limits = ReaderLimits {
        max_member_bytes: 100,
    };
    let (events, err) = read_with(&tar[..], limits);
    assert!(err.is_none());
    assert_eq!(
        outline(&events),
        ol(&[
            ("a", "sample"),
            ("b", "member_too_large"),
            ("c", "member_too_large"),
            ("d", "sample"),
            ("e", "sample"),
            ("f", "sample")
        ])
    );
    assert!(skip(&events[1]).detail.contains("200"));
    let d = sample(&events[3]);
    assert_eq!((d.url.as_ref(), d.meta.as_ref()), (None, None));
    assert_eq!(ReaderLimits::default().max_member_bytes, 64 << 20);
}

// ---------------------------------------------------------------------------------------------
// broken shards

#[test]
fn empty_file_is_an_error() {
    let (events, err) = read(&[]);
    assert!(events.is_empty());
    assert!(matches!(err, Some(ShardError::Empty)), "{err:?}");
    assert!(err.unwrap().to_string().contains("empty file"));
}

#[test]
fn garbage_is_not_a_tar() {
    let mut x = 0x1234_5678u32;
    let noise: Vec<u8> = (0..5000)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    for bytes in [
        &noise[..],
        &noise[..100],
        b"hello world\n",
        b"\x1f\x8b\x08\x00 gzip?",
    ] {
        let (events, err) = read(bytes);
        assert!(events.is_empty());
        assert!(matches!(err, Some(ShardError::NotTar { .. })), "{err:?}");
    }
    // An all-text first block of exactly 512 bytes.
    let (_, err) = read(&[b'a'; 512]);
    assert!(matches!(err, Some(ShardError::NotTar { .. })), "{err:?}");
}

#[test]
fn truncation_inside_a_header() {
    let tar = abc();
    let b_hdr = header_of(&tar, "b.jpg");
    for cut in [b_hdr + 1, b_hdr + 100, b_hdr + 511] {
        let (events, err) = read(&tar[..cut]);
        // a is complete only once b's header is seen, so it is dropped with the cut group.
        assert!(events.is_empty(), "cut {cut}: {events:?}");
        match err {
            Some(ShardError::Truncated { offset, .. }) => assert_eq!(offset, cut as u64),
            other => panic!("cut {cut}: {other:?}"),
        }
    }
    let c_hdr = header_of(&tar, "c.txt");
    let (events, err) = read(&tar[..c_hdr + 300]);
    assert_eq!(outline(&events), ol(&[("a", "sample"), ("b", "sample")]));
    assert!(matches!(err, Some(ShardError::Truncated { .. })), "{err:?}");
}

#[test]
fn truncation_inside_member_data() {
    let tar = abc();
    // Inside b.jpg data (a emitted once b's header is seen; b dropped).
    let b_data = data_of(&tar, "b.jpg");
    for cut in [b_data, b_data + 1, b_data + 512, b_data + 1299] {
        let (events, err) = read(&tar[..cut]);
        assert_eq!(outline(&events), ol(&[("a", "sample")]), "cut {cut}");
        let err = err.unwrap();
        assert!(matches!(err, ShardError::Truncated { .. }), "{err:?}");
        assert!(err.to_string().contains("b.jpg"), "{err}");
    }
    // Inside the padding after c.txt's data: the data is complete, the archive is not.
    let c_txt = data_of(&tar, "c.txt");
    let (events, err) = read(&tar[..c_txt + 9 + 10]);
    assert_eq!(outline(&events), ol(&[("a", "sample"), ("b", "sample")]));
    assert!(matches!(err, Some(ShardError::Truncated { .. })), "{err:?}");
}

#[test]
fn truncation_inside_ignored_member_data() {
    let tar = tar_of(&[
        ("a.jpg", b"A"),
        ("a.txt", b"a"),
        ("a.npz", &[0u8; 5000]),
        ("b.jpg", b"B"),
        ("b.txt", b"b"),
    ]);
    let cut = data_of(&tar, "a.npz") + 2000;
    let (events, err) = read(&tar[..cut]);
    assert!(events.is_empty());
    let err = err.unwrap();
    assert!(
        matches!(err, ShardError::Truncated { .. }) && err.to_string().contains("a.npz"),
        "{err}"
    );
}

#[test]
fn truncation_at_block_boundaries() {
    let tar = abc();
    // Right after a header whose data is missing entirely.
    let b_data = data_of(&tar, "b.jpg");
    assert_eq!(b_data % 512, 0);
    let (events, err) = read(&tar[..b_data]);
    assert_eq!(outline(&events), ol(&[("a", "sample")]));
    assert!(matches!(err, Some(ShardError::Truncated { .. })), "{err:?}");

    // Between complete members: indistinguishable from an archive without end blocks (python
    // tarfile accepts it too). A group cut there is never a Sample unless it is complete.
    let b_txt = header_of(&tar, "b.txt");
    let events = read_ok(&tar[..b_txt]);
    assert_eq!(
        outline(&events),
        ol(&[("a", "sample"), ("b", "no_caption")])
    );
    let c_jpg = header_of(&tar, "c.jpg");
    let events = read_ok(&tar[..c_jpg]);
    assert_eq!(outline(&events), ol(&[("a", "sample"), ("b", "sample")]));
    // Inside the end-of-archive blocks.
    let end = tar.len() - 1024;
    assert_eq!(read_ok(&tar[..end + 100]).len(), 3);
    assert_eq!(read_ok(&tar[..end + 512]).len(), 3);
    assert_eq!(read_ok(&tar[..end + 700]).len(), 3);
}

/// Every possible cut of a small shard: never a panic, never a partially read sample; a cut
/// that is not on a block boundary is always an error.
#[test]
fn every_truncation_point() {
    let tar = abc();
    let full = read_ok(&tar);
    let end = tar.len() - 1024;
    for cut in 0..tar.len() {
        let (events, err) = read(&tar[..cut]);
        for e in &events {
            if let WdsEvent::Sample(s) = e {
                let orig = full.iter().map(sample).find(|o| o.key == s.key).unwrap();
                if cut % 512 != 0 {
                    assert_eq!(s, orig, "cut {cut}");
                } else {
                    // At a block boundary a trailing optional json may be cut off unseen.
                    assert_eq!((&s.image, &s.caption), (&orig.image, &orig.caption));
                }
            }
        }
        if cut < end && cut % 512 != 0 {
            assert!(err.is_some(), "cut {cut} ended cleanly");
        }
        if cut == 0 {
            assert!(matches!(err, Some(ShardError::Empty)));
        }
        if cut >= end {
            assert!(err.is_none(), "cut {cut}: {err:?}");
            assert_eq!(events, full);
        }
    }
}

#[test]
fn bad_checksum_in_a_later_header() {
    let mut tar = abc();
    let b_txt = header_of(&tar, "b.txt");
    tar[b_txt + 3] ^= 0x40;
    let (events, err) = read(&tar);
    assert_eq!(outline(&events), ol(&[("a", "sample")]));
    match err {
        Some(ShardError::CorruptHeader { offset, ref detail }) => {
            assert_eq!(offset, b_txt as u64);
            assert!(detail.contains("checksum"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn garbage_inserted_between_members() {
    let tar = abc();
    let c_jpg = header_of(&tar, "c.jpg");
    let mut bad = tar[..c_jpg].to_vec();
    bad.extend_from_slice(&[0xAB; 700]);
    bad.extend_from_slice(&tar[c_jpg..]);
    let (events, err) = read(&bad);
    // b's group may have continued, so it is dropped with the error.
    assert_eq!(outline(&events), ol(&[("a", "sample")]));
    match err {
        Some(ShardError::CorruptHeader { offset, .. }) => assert_eq!(offset, c_jpg as u64),
        other => panic!("{other:?}"),
    }
}

#[test]
fn zero_block_inserted_between_members_is_not_a_silent_end() {
    let tar = abc();
    let c_jpg = header_of(&tar, "c.jpg");
    let mut bad = tar[..c_jpg].to_vec();
    bad.extend_from_slice(&[0; 512]);
    bad.extend_from_slice(&tar[c_jpg..]);
    let (events, err) = read(&bad);
    assert_eq!(outline(&events), ol(&[("a", "sample")]));
    match err {
        Some(ShardError::TrailingData { end_block, offset }) => {
            assert_eq!(end_block, c_jpg as u64);
            assert_eq!(offset, c_jpg as u64 + 512);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn garbage_appended() {
    // After the end-of-archive blocks.
    let mut bad = abc();
    bad.extend_from_slice(b"trailing junk");
    let (events, err) = read(&bad);
    assert_eq!(outline(&events), ol(&[("a", "sample"), ("b", "sample")]));
    assert!(
        matches!(err, Some(ShardError::TrailingData { .. })),
        "{err:?}"
    );
    // In place of the end-of-archive blocks.
    let mut bad = without_end(abc());
    let at = bad.len() as u64;
    bad.extend_from_slice(&[b'x'; 1000]);
    let (events, err) = read(&bad);
    assert_eq!(outline(&events), ol(&[("a", "sample"), ("b", "sample")]));
    match err {
        Some(ShardError::CorruptHeader { offset, .. }) => assert_eq!(offset, at),
        other => panic!("{other:?}"),
    }
    // Less than a block in place of the end-of-archive blocks.
    let mut bad = without_end(abc());
    bad.extend_from_slice(&[b'x'; 100]);
    let (_, err) = read(&bad);
    assert!(matches!(err, Some(ShardError::Truncated { .. })), "{err:?}");
}

/// A GNU header (binary size field) for `name` claiming `size` bytes.
fn huge_header(name: &str, size: u64, ty: tar::EntryType) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_mode(0o644);
    h.set_entry_type(ty);
    h.set_size(size);
    h.set_cksum();
    h.as_bytes().to_vec()
}

#[test]
fn huge_declared_size_does_not_allocate() {
    const TIB: u64 = 1 << 40;
    let prefix = tar_of(&[("a.jpg", b"A"), ("a.txt", b"a")]);
    let prefix = without_end(prefix);
    for name in ["k.jpg", "k.txt", "k.json", "k.bin"] {
        let mut bad = prefix.clone();
        bad.extend_from_slice(&huge_header(name, TIB, tar::EntryType::Regular));
        bad.extend_from_slice(&[7u8; 3000]);
        for limits in [
            ReaderLimits::default(),
            ReaderLimits {
                max_member_bytes: u64::MAX,
            },
        ] {
            // Also through tiny reads: the cut must be found without buffering the claim.
            let (events, err) = read_with(Chunky::new(&bad[..], false), limits);
            assert_eq!(outline(&events), ol(&[("a", "sample")]), "{name}");
            let err = err.unwrap();
            assert!(
                matches!(err, ShardError::Truncated { .. }),
                "{name}: {err:?}"
            );
            assert!(err.to_string().contains(name), "{err}");
        }
    }
}

#[test]
fn oversized_gnu_long_name_is_refused_not_buffered() {
    let mut bad = huge_header("././@LongLink", 1 << 40, tar::EntryType::GNULongName);
    bad.extend(std::iter::repeat_n(
        b'n',
        (MAX_HEADER_BYTES + 4096) as usize,
    ));
    let (events, err) = read(&bad);
    assert!(events.is_empty());
    assert!(
        matches!(err, Some(ShardError::HeaderTooLarge { offset: 0, .. })),
        "{err:?}"
    );
}

#[test]
fn long_name_without_a_following_member_is_an_error() {
    let mut bad = huge_header("././@LongLink", 10, tar::EntryType::GNULongName);
    bad.extend_from_slice(b"long.jpg\0\0");
    bad.resize(1024, 0);
    let (_, err) = read(&bad);
    assert!(err.is_some(), "{err:?}");
}

#[test]
fn reader_errors_are_reported_with_offset() {
    struct Failing<'a>(&'a [u8]);
    impl Read for Failing<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "network gone",
                ));
            }
            self.0.read(buf)
        }
    }
    let tar = abc();
    let cut = data_of(&tar, "c.jpg") + 5;
    let (events, err) = read_with(Failing(&tar[..cut]), ReaderLimits::default());
    assert_eq!(outline(&events), ol(&[("a", "sample"), ("b", "sample")]));
    match err {
        Some(ShardError::Io { offset, error }) => {
            assert_eq!(offset, cut as u64);
            assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn streaming_in_tiny_chunks_matches_whole_reads() {
    let tar = abc();
    let whole = read_ok(&tar);
    for interrupt in [false, true] {
        let (chunked, err) = read_with(Chunky::new(&tar[..], interrupt), ReaderLimits::default());
        assert!(err.is_none());
        assert_eq!(chunked, whole);
    }
    // Truncated input through tiny chunks fails the same way.
    let cut = data_of(&tar, "b.jpg") + 100;
    let (events, err) = read_with(Chunky::new(&tar[..cut], true), ReaderLimits::default());
    assert_eq!(outline(&events), ol(&[("a", "sample")]));
    assert!(matches!(err, Some(ShardError::Truncated { .. })));
}

#[test]
fn key_ext_helper_is_public() {
    assert_eq!(
        member_key_ext("abc/000001.syn.json"),
        Some(("abc/000001".to_owned(), "syn.json".to_owned()))
    );
    assert_eq!(member_key_ext("._junk"), None);
    assert_eq!(SkipReason::ALL.len(), 8);
}

/// A GNU sparse member whose map continues in an extension block: python tarfile treats it as a
/// regular file, so it must be read (expanded) and skipped with the right length.
#[test]
fn gnu_sparse_member_with_extended_map() {
    let mut h = tar::Header::new_gnu();
    h.set_path("s.jpg").unwrap();
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_size(1024);
    {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.sparse[0].set_offset(0);
        gnu.sparse[0].set_length(512);
        gnu.set_real_size(3000);
        gnu.set_is_extended(true);
    }
    h.set_cksum();
    let mut ext = tar::GnuExtSparseHeader::new();
    ext.sparse[0].set_offset(2048);
    ext.sparse[0].set_length(512);
    // GNU tar ends the map with an empty block at the real size (a trailing hole).
    ext.sparse[1].set_offset(3000);
    ext.sparse[1].set_length(0);
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(ext.as_bytes());
    tar.extend_from_slice(&[b'A'; 512]);
    tar.extend_from_slice(&[b'B'; 512]);
    let rest = tar_of(&[("s.txt", b"sparse"), ("t.jpg", b"T"), ("t.txt", b"t")]);
    tar.extend_from_slice(&rest);

    let events = read_ok(&tar);
    assert_eq!(outline(&events), ol(&[("s", "sample"), ("t", "sample")]));
    let mut want = vec![b'A'; 512];
    want.resize(2048, 0);
    want.extend_from_slice(&[b'B'; 512]);
    want.resize(3000, 0);
    assert_eq!(sample(&events[0]).image, want);
    // Too large once expanded: skipped, and the archive stays in step.
    let (events, err) = read_with(
        &tar[..],
        ReaderLimits {
            max_member_bytes: 2000,
        },
    );
    assert!(err.is_none());
    assert_eq!(
        outline(&events),
        ol(&[("s", "member_too_large"), ("t", "sample")])
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    /// Random corruption never panics or hangs, and what is delivered keeps the reader's
    /// invariants (non-empty image within the limit, trimmed non-empty caption).
    #[test]
    fn mutated_shards_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
        limit in 1u64..2000,
    ) {
        let mut tar = abc();
        for (at, byte) in flips {
            let i = at.index(tar.len());
            tar[i] = byte;
        }
        let cut = cut.index(tar.len() + 1);
        let (events, _err) = read_with(
            Chunky::new(&tar[..cut], true),
            ReaderLimits { max_member_bytes: limit },
        );
        for e in &events {
            if let WdsEvent::Sample(s) = e {
                prop_assert!(!s.image.is_empty() && s.image.len() as u64 <= limit);
                prop_assert!(!s.caption.is_empty() && s.caption.trim() == s.caption);
            }
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..3000)) {
        let (_events, err) = read(&bytes);
        prop_assert!(!bytes.is_empty() || matches!(err, Some(ShardError::Empty)));
    }
}

#[test]
fn extra_members_are_kept_only_when_asked_for() {
    let tar = tar_of(&[
        ("a.jpg", b"img-a"),
        ("a.txt", b"caption a"),
        ("a.syn.json", b"{}"),
        ("a.npz", b"PK"),
        ("a.paug.json", b"[]"),
        ("b.jpg", b"img-b"),
        ("b.txt", b"caption b"),
        ("b.npz", b"one"),
        ("b.npz", b"two"),
    ]);
    let plain: Vec<WdsEvent> = WdsReader::new(&tar[..], ReaderLimits::default())
        .map(Result::unwrap)
        .collect();
    assert!(sample(&plain[0]).extras.is_empty());
    let events: Vec<WdsEvent> = WdsReader::new(&tar[..], ReaderLimits::default())
        .with_extra_members(&["syn.json", "npz"])
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        sample(&events[0]).extras,
        vec![
            ("syn.json".to_string(), b"{}".to_vec()),
            ("npz".to_string(), b"PK".to_vec())
        ]
    );
    match &events[1] {
        WdsEvent::Skip(skip) => assert_eq!(skip.reason, SkipReason::DuplicateKey),
        other => panic!("expected a duplicate skip, got {other:?}"),
    }
}

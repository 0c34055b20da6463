//! Tests of brace expansion and input resolution (list files, globs, URLs, duplicates).

use std::fs;
use std::path::Path;

use dfndr_shards::shardlist::{
    expand_braces, resolve_inputs, ShardListError, ShardRef, MAX_EXPANSION,
};

fn ex(p: &str) -> Vec<String> {
    expand_braces(p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn words(s: &str) -> Vec<String> {
    s.split(' ').map(str::to_owned).collect()
}

fn nums(range: impl Iterator<Item = i64>, width: usize) -> Vec<String> {
    range.map(|n| format!("{n:0width$}")).collect()
}

/// Expected outputs recorded from GNU bash 5.2 (`eval echo PATTERN`).
const BASH_CASES: &[(&str, &str)] = &[
    ("{0..10}", "0 1 2 3 4 5 6 7 8 9 10"),
    ("{00..3}", "00 01 02 03"),
    ("{1..010}", "001 002 003 004 005 006 007 008 009 010"),
    ("{10..01}", "10 09 08 07 06 05 04 03 02 01"),
    ("{100..098}", "100 099 098"),
    ("{100..98}", "100 99 98"),
    ("{0..10..2}", "0 2 4 6 8 10"),
    ("{10..0..3}", "10 7 4 1"),
    ("{1..10..-2}", "1 3 5 7 9"),
    ("{1..5..0}", "1 2 3 4 5"),
    ("{-3..3}", "-3 -2 -1 0 1 2 3"),
    ("{-05..5}", "-05 -04 -03 -02 -01 000 001 002 003 004 005"),
    ("{-3..03}", "-3 -2 -1 00 01 02 03"),
    (
        "{5..-05}",
        "005 004 003 002 001 000 -01 -02 -03 -04 -05",
    ),
    ("{+01..3}", "1 2 3"),
    ("{+1..003}", "001 002 003"),
    ("{1000..0998..500}", "1000"),
    ("{9..0011..4}", "0009"),
    ("{0..00}", "00"),
    ("{-0..2}", "0 1 2"),
    ("{a..e}", "a b c d e"),
    ("{e..a..2}", "e c a"),
    ("{A..C}", "A B C"),
    ("{Z..b}", "Z [ \\ ] ^ _ ` a b"),
    ("{a,b{1..3}}", "a b1 b2 b3"),
    ("{a,b}{1,2}", "a1 a2 b1 b2"),
    ("{1..3}{a,b}", "1a 1b 2a 2b 3a 3b"),
    ("{{1..2},x}", "1 2 x"),
    ("{aa,bb}c{1..2}", "aac1 aac2 bbc1 bbc2"),
    ("{x}", "{x}"),
    ("{}", "{}"),
    ("a{x{a,b}}", "a{xa} a{xb}"),
    ("{1..a}", "{1..a}"),
    ("{a..}", "{a..}"),
    ("{1..3,a}", "1..3 a"),
    ("a\\{b,c\\}", "a{b,c}"),
    ("{a\\,b}", "{a,b}"),
    ("{a,\\}}", "a }"),
    ("{1..2..}", "{1..2..}"),
    ("{ab..c}", "{ab..c}"),
    ("{a,{}}", "a {}"),
    ("plain.tar", "plain.tar"),
    ("a,b.tar", "a,b.tar"),
    (
        "s3://bucket/{train,val}/{0..1}.tar",
        "s3://bucket/train/0.tar s3://bucket/train/1.tar s3://bucket/val/0.tar s3://bucket/val/1.tar",
    ),
];

#[test]
fn brace_expansion_matches_bash() {
    for (pattern, want) in BASH_CASES {
        assert_eq!(ex(pattern), words(want), "{pattern}");
    }
}

#[test]
fn empty_alternatives_are_kept() {
    // bash drops empty words when printing; the expansion itself has them.
    assert_eq!(ex("x{a,}"), vec!["xa", "x"]);
    assert_eq!(ex("{a,}b"), vec!["ab", "b"]);
    assert_eq!(ex("{,}"), vec!["", ""]);
}

/// Cross-check against the bash on this machine when there is one.
#[test]
fn brace_expansion_matches_local_bash() {
    let Ok(out) = std::process::Command::new("bash")
        .arg("-c")
        .arg("printf '%s\\n' {00000..00012}.tar {a,b{1..3}}-{09..11..2} {z..x}{1,2}")
        .output()
    else {
        eprintln!("no bash here; skipped");
        return;
    };
    let bash: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let mut ours = ex("{00000..00012}.tar");
    ours.extend(ex("{a,b{1..3}}-{09..11..2}"));
    ours.extend(ex("{z..x}{1,2}"));
    assert_eq!(ours, bash);
}

#[test]
fn zero_padded_shard_ranges() {
    let v = ex("data/{00000..01023}.tar");
    assert_eq!(v.len(), 1024);
    assert_eq!(v[0], "data/00000.tar");
    assert_eq!(v[7], "data/00007.tar");
    assert_eq!(v[1023], "data/01023.tar");
    assert_eq!(ex("{01..100}"), nums(1..=100, 3));
    assert_eq!(ex("{0..20..5}"), nums((0..=20).step_by(5), 0));
    assert_eq!(ex("{20..0..5}"), vec!["20", "15", "10", "5", "0"]);
}

#[test]
fn unmatched_braces_are_errors() {
    for (p, brace, pos) in [
        ("data/{0..3.tar", '{', 6),
        ("data/0..3}.tar", '}', 10),
        ("{a,{b,c}", '{', 1),
        ("{a,b}}", '}', 6),
        ("}", '}', 1),
    ] {
        match expand_braces(p) {
            Err(ShardListError::UnmatchedBrace {
                brace: b,
                position,
                ref pattern,
            }) => {
                assert_eq!((b, position, pattern.as_str()), (brace, pos, p));
            }
            other => panic!("{p}: {other:?}"),
        }
    }
    let msg = expand_braces("x{1..2").unwrap_err().to_string();
    assert!(
        msg.contains("unmatched '{'") && msg.contains("x{1..2"),
        "{msg}"
    );
    // Escaped braces are not unmatched.
    assert_eq!(ex("x\\{1..2"), vec!["x{1..2"]);
}

#[test]
fn huge_expansions_are_refused() {
    let err = expand_braces("{0..99999999999}").unwrap_err();
    assert!(
        matches!(err, ShardListError::InvalidRange { .. }),
        "{err:?}"
    );
    assert!(expand_braces("{1..99999999999999999999}").is_err());
    assert!(expand_braces("{-9223372036854775808..9223372036854775807}").is_err());
    let err = expand_braces("{0..9999}{0..9999}").unwrap_err();
    assert!(
        matches!(err, ShardListError::TooManyItems { limit, .. } if limit == MAX_EXPANSION),
        "{err:?}"
    );
    // Exactly the limit of a single range is fine in principle; keep the test cheap.
    assert_eq!(ex("{1..100000}").len(), 100_000);
}

// ---------------------------------------------------------------------------------------------
// resolution

fn touch(p: &Path) {
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(p, b"").unwrap();
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

fn resolve(patterns: &[&str]) -> Result<Vec<ShardRef>, ShardListError> {
    let v: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
    resolve_inputs(&v)
}

#[test]
fn plain_paths_are_made_absolute_and_named_by_stem() {
    let shards = resolve(&["/data/x/{000..002}.tar", "/data/y/a.tar.gz", "/data/z/b"]).unwrap();
    let got: Vec<(&str, &str)> = shards
        .iter()
        .map(|s| (s.uri.as_str(), s.name.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("/data/x/000.tar", "000"),
            ("/data/x/001.tar", "001"),
            ("/data/x/002.tar", "002"),
            ("/data/y/a.tar.gz", "a.tar.gz"),
            ("/data/z/b", "b"),
        ]
    );
    // Relative paths are resolved against the current directory; missing files are fine here.
    let rel = resolve(&["no/such/dir/./s-7.tar"]).unwrap();
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(rel[0].uri, s(&cwd.join("no/such/dir/s-7.tar")));
    assert_eq!(rel[0].name, "s-7");
}

#[test]
fn file_urls_become_local_paths() {
    let shards = resolve(&[
        "file:///data/{a,b}.tar",
        "file://localhost/data/c.tar",
        "file:///data/with%20space.tar",
    ])
    .unwrap();
    let uris: Vec<&str> = shards.iter().map(|s| s.uri.as_str()).collect();
    assert_eq!(
        uris,
        vec![
            "/data/a.tar",
            "/data/b.tar",
            "/data/c.tar",
            "/data/with space.tar"
        ]
    );
    assert_eq!(shards[3].name, "with space");
    assert!(matches!(
        resolve(&["file://otherhost/x.tar"]),
        Err(ShardListError::InvalidFileUrl { .. })
    ));
}

#[test]
fn object_store_urls_resolve_without_listing_and_other_schemes_are_refused() {
    // Plain object URLs and brace patterns need no request (globs and list files are listed
    // or read from the store: tests/object_store.rs covers them against a real server).
    let shards = resolve(&[
        "s3://bucket/shards/{0..2}.tar",
        "gs://b/x.tar",
        "az://c/d/y",
    ])
    .unwrap();
    let got: Vec<(&str, &str)> = shards
        .iter()
        .map(|s| (s.name.as_str(), s.uri.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("0", "s3://bucket/shards/0.tar"),
            ("1", "s3://bucket/shards/1.tar"),
            ("2", "s3://bucket/shards/2.tar"),
            ("x", "gs://b/x.tar"),
            ("y", "az://c/d/y"),
        ]
    );
    assert!(matches!(
        resolve(&["s3://bucket/"]),
        Err(ShardListError::NoName { .. })
    ));
    for p in ["http://host/x.tar", "HTTPS://host/x.tar", "ftp://h/x.tar"] {
        match resolve(&[p]) {
            Err(e @ ShardListError::UnsupportedScheme { .. }) => {
                assert!(e.to_string().contains("s3://, gs:// or az://"), "{e}");
            }
            other => panic!("{p}: {other:?}"),
        }
    }
}

#[test]
fn globs_are_sorted_and_must_match() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for name in ["b-2.tar", "a-1.tar", "c-3.tar", "notes.md", "._a-1.tar"] {
        touch(&root.join("g").join(name));
    }
    fs::create_dir_all(root.join("g/sub.tar")).unwrap();
    let pattern = format!("{}/g/*.tar", s(root));
    let shards = resolve(&[&pattern]).unwrap();
    let names: Vec<&str> = shards.iter().map(|s| s.name.as_str()).collect();
    // Sorted; hidden files and directories excluded.
    assert_eq!(names, vec!["a-1", "b-2", "c-3"]);
    assert_eq!(shards[0].uri, s(&root.join("g/a-1.tar")));

    let q = format!("{}/g/?-[12].tar", s(root));
    let names: Vec<String> = resolve(&[&q])
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, vec!["a-1", "b-2"]);

    // Brace expansion happens first, then each item is globbed.
    let both = format!("{}/g/{{a,c}}*.tar", s(root));
    assert_eq!(resolve(&[&both]).unwrap().len(), 2);

    let none = format!("{}/g/*.parquet", s(root));
    match resolve(&[&none]) {
        Err(ShardListError::NoMatch { pattern }) => assert_eq!(pattern, none),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        resolve(&[&format!("{}/g/[.tar", s(root))]),
        Err(ShardListError::InvalidGlob { .. })
    ));
}

#[test]
fn list_files_with_comments_relative_entries_braces_and_globs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for name in ["d/s0.tar", "d/s1.tar", "d/s2.tar", "d/g/x.tar", "d/g/y.tar"] {
        touch(&root.join(name));
    }
    let list = root.join("d/shards.txt");
    fs::write(
        &list,
        "\u{feff}# training shards\n\
         \n\
         s{0..1}.tar\n\
         \x20  s2.tar   \n\
         # g/ignored.tar\n\
         g/*.tar\n\
         /abs/elsewhere/far.tar\n\
         file:///abs/url/u.tar\n\
         s0.tar\n",
    )
    .unwrap();
    let shards = resolve(&[&s(&list)]).unwrap();
    let got: Vec<String> = shards.iter().map(|s| s.uri.clone()).collect();
    let d = root.join("d");
    assert_eq!(
        got,
        vec![
            s(&d.join("s0.tar")),
            s(&d.join("s1.tar")),
            s(&d.join("s2.tar")),
            s(&d.join("g/x.tar")),
            s(&d.join("g/y.tar")),
            "/abs/elsewhere/far.tar".to_owned(),
            "/abs/url/u.tar".to_owned(),
        ]
    );

    // .list and .lst too, via file:// and brace patterns naming several lists.
    fs::write(root.join("d/a.list"), "s0.tar\n").unwrap();
    fs::write(root.join("d/b.lst"), "s1.tar\n").unwrap();
    let lists = format!("file://{}/d/{{a.list,b.lst}}", s(root));
    let names: Vec<String> = resolve(&[&lists])
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, vec!["s0", "s1"]);
}

#[test]
fn list_file_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let outer = root.join("outer.txt");
    fs::write(&outer, "a.tar\n\ninner.txt\n").unwrap();
    match resolve(&[&s(&outer)]) {
        Err(ShardListError::NestedListFile { line, entry, .. }) => {
            assert_eq!((line, entry.as_str()), (3, "inner.txt"));
        }
        other => panic!("{other:?}"),
    }

    let bad = root.join("bad.lst");
    fs::write(&bad, "ok.tar\nhttp://host/x.tar\n").unwrap();
    match resolve(&[&s(&bad)]) {
        Err(ShardListError::InList { line, error, .. }) => {
            assert_eq!(line, 2);
            assert!(matches!(*error, ShardListError::UnsupportedScheme { .. }));
        }
        other => panic!("{other:?}"),
    }

    let missing = root.join("missing.txt");
    let err = resolve(&[&s(&missing)]).unwrap_err();
    assert!(
        matches!(err, ShardListError::ListFile { .. }) && err.to_string().contains("missing.txt"),
        "{err}"
    );

    let glob_miss = root.join("globs.txt");
    fs::write(&glob_miss, "nothing-*.tar\n").unwrap();
    let err = resolve(&[&s(&glob_miss)]).unwrap_err();
    assert!(err.to_string().contains("line 1"), "{err}");
    assert!(err.to_string().contains("matches no files"), "{err}");
}

#[test]
fn duplicates() {
    // Exact duplicates are dropped, first position kept.
    let shards = resolve(&["/d/a.tar", "/d/b.tar", "/d/./a.tar", "file:///d/b.tar"]).unwrap();
    let names: Vec<&str> = shards.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["a", "b"]);

    // Same stem, different location: an error naming both.
    match resolve(&["/d1/{00..02}.tar", "/d2/01.tar"]) {
        Err(e @ ShardListError::DuplicateName { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("/d1/01.tar") && msg.contains("/d2/01.tar"),
                "{msg}"
            );
            assert!(msg.contains("\"01\""), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    // `x.tar` and `x` share the name `x`.
    assert!(matches!(
        resolve(&["/d/x.tar", "/d/x"]),
        Err(ShardListError::DuplicateName { .. })
    ));
}

#[test]
fn empty_and_nameless_inputs() {
    assert!(resolve(&[]).unwrap().is_empty());
    assert!(matches!(
        resolve(&["  "]),
        Err(ShardListError::EmptyPattern { .. })
    ));
    assert!(matches!(
        resolve(&["/d/{a,}"]),
        Ok(v) if v.len() == 2
    ));
    assert!(matches!(
        resolve(&["{,/d/a.tar}"]),
        Err(ShardListError::EmptyPattern { .. })
    ));
    assert!(matches!(
        resolve(&["/d/.tar"]),
        Err(ShardListError::NoName { .. })
    ));
}

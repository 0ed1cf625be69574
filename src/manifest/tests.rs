//! Hostile and ordinary manifests.

use super::*;

fn d(n: u8) -> String {
    Digest::of(&[n]).to_string()
}

fn image(layers: usize) -> String {
    let layers: Vec<String> = (0..layers)
        .map(|i| {
            format!(
                r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{i}}}"#,
                d(i as u8)
            )
        })
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":7}},"layers":[{}],"annotations":{{"a":"b"}}}}"#,
        d(200),
        layers.join(",")
    )
}

fn index(children: &[(&str, &str)]) -> String {
    let m: Vec<String> = children
        .iter()
        .enumerate()
        .map(|(i, (arch, digest))| {
            format!(
                r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{digest}","size":{i},"platform":{{"os":"linux","architecture":"{arch}"}}}}"#
            )
        })
        .collect();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
        m.join(",")
    )
}

fn limits() -> ManifestLimits {
    ManifestLimits::default()
}

#[test]
fn ordinary_manifests_parse() {
    let Manifest::Image(m) = parse(image(3).as_bytes(), Some(OCI_MANIFEST), &limits()).unwrap()
    else {
        panic!("not an image")
    };
    assert_eq!(m.layers.len(), 3);
    assert_eq!(m.config.size, 7);
    m.check_layers_mountable().unwrap();
    let x = d(9);
    let i = index(&[("arm64", &d(8)), ("amd64", &x)]);
    let Manifest::Index(i) = parse(i.as_bytes(), Some("application/json"), &limits()).unwrap()
    else {
        panic!("not an index")
    };
    assert_eq!(
        i.pick("linux", "amd64").map(|d| d.digest.to_string()),
        Some(x)
    );
    assert!(i.pick("linux", "s390x").is_none());
    // Without any media type: told apart by the fields (Docker's old documents).
    let bare = r#"{"schemaVersion":2,"manifests":[]}"#;
    assert!(matches!(
        parse(bare.as_bytes(), None, &limits()),
        Ok(Manifest::Index(_))
    ));
}

#[test]
fn malformed_manifests_are_clear_errors() {
    let cases: &[(&str, &str)] = &[
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ("[1,2]", "not valid JSON"),
        (r#"{"schemaVersion":1}"#, "schemaVersion Some(1)"),
        (r#"{"layers":[]}"#, "schemaVersion None"),
        (r#"{"schemaVersion":2,"config":{}}"#, "not valid JSON"),
        (
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[]}"#,
            "without `config`",
        ),
        (
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}"#,
            "without `manifests`",
        ),
        (
            r#"{"schemaVersion":2,"manifests":[{"digest":"sha256:zz","size":1}]}"#,
            "not valid JSON",
        ),
        (
            r#"{"schemaVersion":2,"manifests":[{"digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":-1}]}"#,
            "not valid JSON",
        ),
        ("\u{0}\u{ff}binary", "not valid JSON"),
    ];
    for (text, want) in cases {
        let err = parse(text.as_bytes(), None, &limits())
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{text}: {err}");
    }
}

#[test]
fn unknown_and_mismatched_media_types_are_refused() {
    let doc = image(1).replace(OCI_MANIFEST, "application/vnd.example.thing+json");
    assert_eq!(
        parse(doc.as_bytes(), None, &limits()),
        Err(ManifestError::UnknownMediaType(
            "application/vnd.example.thing+json".into()
        ))
    );
    assert!(matches!(
        parse(image(1).as_bytes(), Some(OCI_INDEX), &limits()),
        Err(ManifestError::MediaTypeMismatch { .. })
    ));
    // A Content-Type with parameters still counts.
    let ct = format!("{OCI_MANIFEST}; charset=utf-8");
    assert!(parse(image(1).as_bytes(), Some(&ct), &limits()).is_ok());
    // Unknown layer media types parse, but cannot be mounted.
    let odd = image(2).replace(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/x-rar",
    );
    let Ok(Manifest::Image(m)) = parse(odd.as_bytes(), None, &limits()) else {
        panic!("should parse")
    };
    let err = m.check_layers_mountable().unwrap_err();
    assert!(err.to_string().contains("application/x-rar"), "{err}");
}

#[test]
fn huge_manifests_are_refused_before_parsing() {
    let lim = ManifestLimits {
        max_bytes: 1000,
        ..limits()
    };
    // Not even valid JSON: the size check comes first.
    let big = vec![b'{'; 1001];
    assert_eq!(
        parse(&big, None, &lim),
        Err(ManifestError::TooLarge {
            size: 1001,
            limit: 1000
        })
    );
    let many = image(1025);
    assert_eq!(
        parse(many.as_bytes(), None, &limits()),
        Err(ManifestError::TooManyDescriptors {
            what: "image manifest",
            count: 1025,
            limit: 1024
        })
    );
    let children: Vec<String> = (0..2000).map(|i| d(i as u8)).collect();
    let pairs: Vec<(&str, &str)> = children.iter().map(|c| ("amd64", c.as_str())).collect();
    assert!(matches!(
        parse(index(&pairs).as_bytes(), None, &limits()),
        Err(ManifestError::TooManyDescriptors { count: 2000, .. })
    ));
}

#[test]
fn deep_nesting_and_nested_indexes_are_refused() {
    // 100 000 nested arrays: skipped without recursion in an ignored field, a type
    // error where a descriptor is expected; never a stack overflow.
    let nest = |field: &str| {
        format!(
            r#"{{"schemaVersion":2,"{field}":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        )
    };
    let err = parse(nest("annotations").as_bytes(), None, &limits()).unwrap_err();
    assert_eq!(
        err,
        ManifestError::Malformed("image manifest without `config`")
    );
    let err = parse(nest("layers").as_bytes(), None, &limits()).unwrap_err();
    assert!(err.to_string().contains("invalid type: sequence"), "{err}");
    // Nested objects in a parsed position hit serde_json's recursion limit.
    let deep = format!(
        r#"{{"schemaVersion":2,"config":{}}}"#,
        r#"{"platform":"#.repeat(100_000)
    );
    let err = parse(deep.as_bytes(), None, &limits()).unwrap_err();
    assert!(matches!(err, ManifestError::Json(_)), "{err}");
    // An index whose platform child is an index again: not followed.
    let inner = index(&[("amd64", &d(1))]);
    let child = Digest::of(inner.as_bytes());
    assert_eq!(
        parse_child(child, inner.as_bytes(), None, &limits()),
        Err(ManifestError::NestedIndex(child))
    );
    // An index listing (what claims to be) itself is just a nested index.
    let outer = index(&[("amd64", &child.to_string())]);
    let Ok(Manifest::Index(i)) = parse(outer.as_bytes(), None, &limits()) else {
        panic!("outer parses")
    };
    let pick = i.pick("linux", "amd64").unwrap().digest;
    assert!(matches!(
        parse_child(pick, outer.as_bytes(), None, &limits()),
        Err(ManifestError::NestedIndex(_))
    ));
}

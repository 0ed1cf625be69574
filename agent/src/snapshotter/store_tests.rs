//! containerd's snapshot rules on the store, over a real RocksDB in a temp dir.

use super::*;
use crate::snapshotter::records::Kind;
use imgd_core::Digest;

fn open(dir: &Path) -> SnapshotStore {
    let cache = Arc::new(ChunkCache::open(&dir.join("cache"), 1 << 30).unwrap());
    SnapshotStore::open(cache, &dir.join("snap")).unwrap()
}

fn remote(n: u8) -> RemoteLayer {
    RemoteLayer {
        layer: Digest::of(&[n]),
        repo: "local/app".into(),
        ns: None,
        image: "127.0.0.1:5000/local/app:1".into(),
    }
}

fn no_labels() -> BTreeMap<String, String> {
    BTreeMap::new()
}

#[test]
fn prepare_commit_and_lowers_follow_containerds_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let s = open(tmp.path());
    let a = s.create("ns/1/a", None, Kind::Active, no_labels()).unwrap();
    assert!(s.fs_dir(a.id).is_dir() && s.work_dir(a.id).is_dir());
    assert!(matches!(
        s.create("ns/1/a", None, Kind::Active, no_labels()),
        Err(SnapshotError::AlreadyExists(_))
    ));
    // An active snapshot is no parent; a missing one is not found.
    assert!(matches!(
        s.create("b", Some("ns/1/a"), Kind::Active, no_labels()),
        Err(SnapshotError::FailedPrecondition(_))
    ));
    assert!(matches!(
        s.create("b", Some("nope"), Kind::Active, no_labels()),
        Err(SnapshotError::NotFound(_))
    ));
    s.commit("base", "ns/1/a", no_labels(), Usage::default())
        .unwrap();
    assert!(matches!(s.get("ns/1/a"), Err(SnapshotError::NotFound(_))));
    let base = s.get("base").unwrap();
    assert_eq!((base.kind, base.id), (Kind::Committed, a.id));
    assert!(matches!(
        s.commit("again", "base", no_labels(), Usage::default()),
        Err(SnapshotError::FailedPrecondition(_))
    ));
    let top = s
        .create("top", Some("base"), Kind::Active, no_labels())
        .unwrap();
    assert_eq!(
        s.lowers(Some("base")).unwrap(),
        vec![Lower::Dir(s.fs_dir(a.id))]
    );
    assert!(top.id > a.id);
    // A parent with children cannot go.
    assert!(matches!(
        s.remove("base"),
        Err(SnapshotError::FailedPrecondition(_))
    ));
    s.remove("top").unwrap();
    s.remove("base").unwrap();
    assert!(s.list().unwrap().is_empty());
}

#[test]
fn placeholders_chain_into_one_view_below_ordinary_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let s = open(tmp.path());
    s.create_placeholder("c1", None, no_labels(), remote(1))
        .unwrap();
    s.create_placeholder("c2", Some("c1"), no_labels(), remote(2))
        .unwrap();
    assert!(matches!(
        s.create_placeholder("c2", Some("c1"), no_labels(), remote(2)),
        Err(SnapshotError::AlreadyExists(_))
    ));
    assert!(s.is_remote_or_root(None).unwrap() && s.is_remote_or_root(Some("c2")).unwrap());
    let chain = s.chain("c2").unwrap();
    assert_eq!(chain, vec![remote(1), remote(2)]);
    // An unpacked layer on the chain (e.g. a zstd one), then a container on it.
    s.create("x", Some("c2"), Kind::Active, no_labels())
        .unwrap();
    let x = s.get("x").unwrap();
    s.commit("c3", "x", no_labels(), Usage::default()).unwrap();
    assert!(!s.is_remote_or_root(Some("c3")).unwrap());
    assert_eq!(
        s.lowers(Some("c3")).unwrap(),
        vec![Lower::Dir(s.fs_dir(x.id)), Lower::View("c2".into())]
    );
    assert!(matches!(
        s.chain("c3"),
        Err(SnapshotError::FailedPrecondition(_))
    ));
}

#[test]
fn records_and_ids_survive_reopen_and_labels_update_by_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let first = {
        let s = open(tmp.path());
        let mut labels = no_labels();
        labels.insert("a".into(), "1".into());
        s.create("k", None, Kind::View, labels).unwrap().id
    };
    let s = open(tmp.path());
    let next = s.create("k2", None, Kind::Active, no_labels()).unwrap();
    assert!(next.id > first, "ids are not reused after reopen");
    let mut set = no_labels();
    set.insert("b".into(), "2".into());
    let r = s
        .update_labels("k", set.clone(), &["labels.b".into()])
        .unwrap();
    assert_eq!(r.labels.len(), 2);
    let r = s
        .update_labels("k", no_labels(), &["labels.a".into()])
        .unwrap();
    assert_eq!(r.labels, set);
    let r = s.update_labels("k", no_labels(), &[]).unwrap();
    assert!(r.labels.is_empty());
    assert!(matches!(
        s.update_labels("k", no_labels(), &["parent".into()]),
        Err(SnapshotError::InvalidArgument(_))
    ));
}

//! The last step of a build: numbering the inodes still reachable from the root.

use super::{Kind, Tree, ROOT};
use crate::view::{Ino, Node, NodeKind, ViewStats, ROOT_INO};

impl Tree {
    /// Numbers the nodes reachable from the root breadth first (root 1), counts names
    /// and subdirectories, and converts them into [`Node`]s.
    pub(super) fn finish(self) -> (Vec<Node>, ViewStats) {
        let n = self.nodes.len();
        let mut ino_of: Vec<Ino> = vec![0; n];
        let mut parent_of: Vec<Ino> = vec![ROOT_INO; n];
        let mut names = vec![0u32; n];
        let mut subdirs = vec![0u32; n];
        let mut order = vec![ROOT];
        ino_of[ROOT] = ROOT_INO;
        let mut next = 0;
        while let Some(&a) = order.get(next) {
            next += 1;
            let Kind::Dir(children) = &self.nodes[a].kind else {
                continue;
            };
            for &c in children.values() {
                names[c] = names[c].saturating_add(1);
                if self.is_dir(c) {
                    subdirs[a] = subdirs[a].saturating_add(1);
                }
                if ino_of[c] == 0 {
                    order.push(c);
                    ino_of[c] = order.len() as Ino;
                    parent_of[c] = ino_of[a];
                }
            }
        }
        let mut stats = ViewStats {
            skipped_entries: self.skipped,
            ..ViewStats::default()
        };
        let mut slots: Vec<Option<Node>> = (0..order.len()).map(|_| None).collect();
        for (a, b) in self.nodes.into_iter().enumerate() {
            let ino = ino_of[a];
            let Some(slot) = ino.checked_sub(1).and_then(|i| slots.get_mut(i as usize)) else {
                continue; // unreachable: removed or replaced
            };
            let (kind, nlink) = match b.kind {
                Kind::Dir(children) => {
                    stats.dirs += 1;
                    let children = children
                        .into_iter()
                        .map(|(name, c)| (name, ino_of[c]))
                        .collect();
                    (NodeKind::Dir { children }, subdirs[a].saturating_add(2))
                }
                Kind::Leaf(kind) => {
                    match &kind {
                        NodeKind::File { size, .. } => {
                            stats.files += 1;
                            stats.total_file_bytes = stats.total_file_bytes.saturating_add(*size);
                        }
                        NodeKind::Symlink { .. } => stats.symlinks += 1,
                        NodeKind::CharDevice { .. } | NodeKind::BlockDevice { .. } => {
                            stats.devices += 1
                        }
                        NodeKind::Fifo => stats.fifos += 1,
                        NodeKind::Dir { .. } => {}
                    }
                    stats.extra_links += u64::from(names[a].saturating_sub(1));
                    (kind, names[a])
                }
            };
            *slot = Some(Node {
                ino,
                kind,
                mode: b.meta.mode,
                uid: b.meta.uid,
                gid: b.meta.gid,
                mtime: b.meta.mtime,
                mtime_nsec: b.meta.mtime_nsec,
                nlink,
                xattrs: b.meta.xattrs,
                parent: parent_of[a],
            });
        }
        (slots.into_iter().flatten().collect(), stats)
    }
}

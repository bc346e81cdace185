//! The inode table of a connect mount: the kernel knows files by number, the wire by path.
//!
//! A tree of names: each node keeps its parent's number and its own name, so a rename moves
//! a whole subtree by changing one node, and a node costs its name, not its path. A node
//! lives while the kernel holds a lookup on it (`lookup` counts, `forget` takes back) or
//! while a child needs it for its path. Numbers are never reused (a new file at an old path
//! gets a new number), so a number is stable as long as the kernel knows it.
//!
//! Bounded: past `max_nodes` nodes or `max_name_bytes` of names, a new node is refused
//! with `ENOMEM` (the kernel gives back what it no longer caches with `forget`).

use std::collections::HashMap;

use berth_connect::proto::RelPath;

/// The root's number (FUSE's).
pub const ROOT: u64 = 1;

/// The longest name of one component (Linux's `NAME_MAX`).
const NAME_MAX: usize = 255;

/// The longest path on the wire (`RelPath::is_valid`).
const PATH_MAX: usize = 4095;

struct Node {
    parent: u64,
    name: Vec<u8>,
    /// False once unlinked or renamed over: the node has no path any more.
    linked: bool,
    lookups: u64,
    children: u64,
}

pub struct Inodes {
    nodes: HashMap<u64, Node>,
    by_name: HashMap<(u64, Vec<u8>), u64>,
    next: u64,
    name_bytes: usize,
    max_nodes: usize,
    max_name_bytes: usize,
}

impl Inodes {
    pub fn new(max_nodes: usize, max_name_bytes: usize) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                parent: ROOT,
                name: Vec::new(),
                linked: true,
                lookups: 1,
                children: 0,
            },
        );
        Self {
            nodes,
            by_name: HashMap::new(),
            next: ROOT + 1,
            name_bytes: 0,
            max_nodes,
            max_name_bytes,
        }
    }

    /// The directory `ino` is in (the root's is the root), if the table holds `ino`.
    pub fn parent(&self, ino: u64) -> Option<u64> {
        self.nodes.get(&ino).map(|n| n.parent)
    }

    /// How many nodes the table holds (the root included).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The path of `ino` on the wire.
    pub fn path(&self, ino: u64) -> Result<RelPath, i32> {
        let mut names: Vec<&[u8]> = Vec::new();
        let mut len = 0usize;
        let mut at = ino;
        while at != ROOT {
            let node = self.nodes.get(&at).ok_or(libc::ESTALE)?;
            if !node.linked {
                return Err(libc::ENOENT);
            }
            len = len.saturating_add(node.name.len() + 1);
            // Also ends a cycle, which the table never makes.
            if len > PATH_MAX + 1 {
                return Err(libc::ENAMETOOLONG);
            }
            names.push(&node.name);
            at = node.parent;
        }
        let mut path = Vec::with_capacity(len);
        for name in names.iter().rev() {
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(name);
        }
        Ok(RelPath(path))
    }

    /// The path of `name` in the directory `parent`.
    pub fn child_path(&self, parent: u64, name: &[u8]) -> Result<RelPath, i32> {
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        let path = self.path(parent)?.join(name).ok_or(libc::EINVAL)?;
        if path.0.len() > PATH_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        Ok(path)
    }

    /// The number of `name` in `parent` if the table has one.
    pub fn find(&self, parent: u64, name: &[u8]) -> Option<u64> {
        self.by_name.get(&(parent, name.to_vec())).copied()
    }

    /// The number the kernel is told for `name` in `parent`; one more lookup on it.
    pub fn remember(&mut self, parent: u64, name: &[u8]) -> Result<u64, i32> {
        let key = (parent, name.to_vec());
        if let Some(&ino) = self.by_name.get(&key)
            && let Some(node) = self.nodes.get_mut(&ino)
        {
            node.lookups = node.lookups.saturating_add(1);
            return Ok(ino);
        }
        if name.is_empty() || name.len() > NAME_MAX {
            return Err(libc::EINVAL);
        }
        if self.nodes.len() >= self.max_nodes
            || self.name_bytes.saturating_add(name.len()) > self.max_name_bytes
        {
            return Err(libc::ENOMEM);
        }
        let Some(dir) = self.nodes.get_mut(&parent) else {
            return Err(libc::ESTALE);
        };
        dir.children += 1;
        let ino = self.next;
        self.next += 1;
        self.name_bytes += name.len();
        self.nodes.insert(
            ino,
            Node {
                parent,
                name: name.to_vec(),
                linked: true,
                lookups: 1,
                children: 0,
            },
        );
        self.by_name.insert(key, ino);
        Ok(ino)
    }

    /// The kernel forgets `n` lookups of `ino`.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_sub(n);
        }
        self.collect(ino);
    }

    /// `name` in `parent` is gone (unlink, rmdir).
    pub fn unlinked(&mut self, parent: u64, name: &[u8]) {
        if let Some(ino) = self.by_name.remove(&(parent, name.to_vec())) {
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.linked = false;
            }
            self.collect(ino);
        }
    }

    /// `name` in `parent` is now `new_name` in `new_parent`; with `exchange` the two swapped.
    pub fn renamed(
        &mut self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        exchange: bool,
    ) {
        let from = self.by_name.remove(&(parent, name.to_vec()));
        let to = self.by_name.remove(&(new_parent, new_name.to_vec()));
        if let Some(ino) = to {
            if exchange {
                self.place(ino, parent, name);
            } else if let Some(node) = self.nodes.get_mut(&ino) {
                node.linked = false;
            }
        }
        if let Some(ino) = from {
            self.place(ino, new_parent, new_name);
        }
        for ino in [from, to].into_iter().flatten() {
            self.collect(ino);
        }
    }

    /// Moves `ino` (out of the name index) to `name` in `parent`.
    fn place(&mut self, ino: u64, parent: u64, name: &[u8]) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        let old_parent = node.parent;
        self.name_bytes = self.name_bytes.saturating_sub(node.name.len()) + name.len();
        node.parent = parent;
        node.name = name.to_vec();
        node.linked = true;
        if let Some(dir) = self.nodes.get_mut(&parent) {
            dir.children += 1;
        }
        if let Some(dir) = self.nodes.get_mut(&old_parent) {
            dir.children = dir.children.saturating_sub(1);
        }
        self.by_name.insert((parent, name.to_vec()), ino);
        self.collect(old_parent);
    }

    /// Drops `ino` and then its ancestors while nothing needs them.
    fn collect(&mut self, mut ino: u64) {
        while ino != ROOT {
            let Some(node) = self.nodes.get(&ino) else {
                return;
            };
            if node.lookups > 0 || node.children > 0 {
                return;
            }
            let parent = node.parent;
            let key = (parent, node.name.clone());
            if self.by_name.get(&key) == Some(&ino) {
                self.by_name.remove(&key);
            }
            self.name_bytes = self.name_bytes.saturating_sub(node.name.len());
            self.nodes.remove(&ino);
            match self.nodes.get_mut(&parent) {
                Some(dir) => dir.children = dir.children.saturating_sub(1),
                None => return,
            }
            ino = parent;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn path(t: &Inodes, ino: u64) -> String {
        String::from_utf8(t.path(ino).unwrap().0).unwrap()
    }

    #[test]
    fn paths_follow_renames_of_a_subtree() {
        let mut t = Inodes::new(100, 1 << 20);
        let a = t.remember(ROOT, b"a").unwrap();
        let b = t.remember(a, b"b").unwrap();
        let c = t.remember(b, b"c").unwrap();
        assert_eq!(path(&t, c), "a/b/c");
        assert_eq!(path(&t, ROOT), "");
        let z = t.remember(ROOT, b"z").unwrap();
        t.renamed(a, b"b", z, b"y", false);
        assert_eq!(path(&t, c), "z/y/c");
        assert_eq!(t.find(z, b"y"), Some(b));
        assert_eq!(t.find(a, b"b"), None);
        // Exchange swaps both.
        t.renamed(ROOT, b"a", z, b"y", true);
        assert_eq!(path(&t, a), "z/y");
        assert_eq!(path(&t, c), "a/c");
    }

    #[test]
    fn rename_over_and_unlink_leave_the_old_node_without_a_path() {
        let mut t = Inodes::new(100, 1 << 20);
        let x = t.remember(ROOT, b"x").unwrap();
        let y = t.remember(ROOT, b"y").unwrap();
        t.renamed(ROOT, b"x", ROOT, b"y", false);
        assert_eq!(path(&t, x), "y");
        assert_eq!(t.path(y), Err(libc::ENOENT));
        // A new file at the old path gets a new number.
        let x2 = t.remember(ROOT, b"x").unwrap();
        assert_ne!(x2, x);
        t.unlinked(ROOT, b"x");
        assert_eq!(t.path(x2), Err(libc::ENOENT));
        t.forget(x2, 1);
        t.forget(y, 1);
        assert_eq!(t.len(), 2);
        assert_eq!(t.path(y), Err(libc::ESTALE));
    }

    #[test]
    fn nodes_live_while_looked_up_or_needed_by_a_child() {
        let mut t = Inodes::new(100, 1 << 20);
        let a = t.remember(ROOT, b"a").unwrap();
        assert_eq!(t.remember(ROOT, b"a").unwrap(), a);
        let b = t.remember(a, b"b").unwrap();
        t.forget(a, 2);
        assert_eq!(path(&t, b), "a/b");
        t.forget(b, 1);
        assert_eq!(t.len(), 1);
        assert_eq!(t.name_bytes, 0);
        t.forget(ROOT, 10);
        assert_eq!(path(&t, ROOT), "");
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = Inodes::new(3, 1 << 20);
        let a = t.remember(ROOT, b"a").unwrap();
        t.remember(ROOT, b"b").unwrap();
        assert_eq!(t.remember(ROOT, b"c"), Err(libc::ENOMEM));
        // Known names still count lookups.
        assert_eq!(t.remember(ROOT, b"a"), Ok(a));
        t.forget(a, 2);
        assert!(t.remember(ROOT, b"c").is_ok());

        let mut t = Inodes::new(100, 10);
        t.remember(ROOT, b"0123456789").unwrap();
        assert_eq!(t.remember(ROOT, b"x"), Err(libc::ENOMEM));
        assert_eq!(t.child_path(ROOT, &[b'n'; 256]), Err(libc::ENAMETOOLONG));
        assert_eq!(t.child_path(ROOT, b"a/b"), Err(libc::EINVAL));
    }
}

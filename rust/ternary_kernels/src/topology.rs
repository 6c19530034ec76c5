//! CPU and NUMA topology from sysfs: which CPUs are online and which node each belongs to.
//!
//! Reads <root>/devices/system/cpu/online and <root>/devices/system/node/node*/cpulist, where root is
//! /sys unless NANOCHAT_SYSFS_ROOT says otherwise (tests point it at fabricated trees). Without a
//! node directory (non-NUMA kernels) all online CPUs form one node.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub id: usize,
    /// Online CPUs of this node, ascending.
    pub cpus: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Nodes with at least one online CPU, by id.
    pub nodes: Vec<Node>,
}

/// Parse a kernel cpulist such as "0-3,8,10-11\n" (empty means none).
pub fn parse_cpulist(text: &str) -> Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for piece in text.trim().split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || Error::Threads(format!("cpulist: cannot parse {piece:?} in {:?}", text.trim()));
        match piece.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(piece.parse().map_err(|_| bad())?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

fn read_cpulist(path: &Path) -> Result<Vec<usize>> {
    let text = fs::read_to_string(path).map_err(|e| Error::Threads(format!("{}: {e}", path.display())))?;
    parse_cpulist(&text).map_err(|e| Error::Threads(format!("{}: {e}", path.display())))
}

impl Topology {
    /// Read the topology under `root` (normally /sys).
    pub fn read(root: &Path) -> Result<Topology> {
        let online_path = root.join("devices/system/cpu/online");
        let online = if online_path.exists() {
            read_cpulist(&online_path)?
        } else {
            (0..std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).collect()
        };
        let node_dir = root.join("devices/system/node");
        let mut nodes = Vec::new();
        if let Ok(entries) = fs::read_dir(&node_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(id) = name.strip_prefix("node").and_then(|n| n.parse::<usize>().ok()) else { continue };
                let cpus: Vec<usize> =
                    read_cpulist(&entry.path().join("cpulist"))?.into_iter().filter(|c| online.contains(c)).collect();
                if !cpus.is_empty() {
                    nodes.push(Node { id, cpus });
                }
            }
        }
        nodes.sort_by_key(|n| n.id);
        if nodes.is_empty() {
            if online.is_empty() {
                return Err(Error::Threads(format!("{}: no online CPUs", online_path.display())));
            }
            nodes.push(Node { id: 0, cpus: online });
        }
        Ok(Topology { nodes })
    }

    /// The machine's topology (NANOCHAT_SYSFS_ROOT or /sys); one node of all CPUs if sysfs is unreadable.
    pub fn detect() -> Topology {
        let root = std::env::var_os("NANOCHAT_SYSFS_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/sys"));
        Topology::read(&root).unwrap_or_else(|_| {
            let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            Topology { nodes: vec![Node { id: 0, cpus: (0..n).collect() }] }
        })
    }

    pub fn cpu_count(&self) -> usize {
        self.nodes.iter().map(|n| n.cpus.len()).sum()
    }

    /// (cpu, node index) for each of `threads` threads: nodes take turns so threads spread evenly,
    /// and CPUs are reused (oversubscribed) only when there are more threads than CPUs.
    pub fn assign(&self, threads: usize) -> Vec<(usize, usize)> {
        let mut order = Vec::new();
        let deepest = self.nodes.iter().map(|n| n.cpus.len()).max().unwrap_or(0);
        for round in 0..deepest {
            for (ni, node) in self.nodes.iter().enumerate() {
                if let Some(&cpu) = node.cpus.get(round) {
                    order.push((cpu, ni));
                }
            }
        }
        (0..threads).map(|i| order[i % order.len()]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sysfs(online: &str, nodes: &[(usize, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let cpu = dir.path().join("devices/system/cpu");
        fs::create_dir_all(&cpu).unwrap();
        fs::write(cpu.join("online"), online).unwrap();
        for (id, list) in nodes {
            let node = dir.path().join(format!("devices/system/node/node{id}"));
            fs::create_dir_all(&node).unwrap();
            fs::write(node.join("cpulist"), list).unwrap();
        }
        // Noise the parser must skip.
        fs::create_dir_all(dir.path().join("devices/system/node/power")).unwrap();
        dir
    }

    #[test]
    fn cpulists() {
        assert_eq!(parse_cpulist("0-3,8,10-11\n").unwrap(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpulist("\n").unwrap(), Vec::<usize>::new());
        assert!(parse_cpulist("3-1").is_err());
        assert!(parse_cpulist("a").is_err());
    }

    #[test]
    fn one_node() {
        let d = fake_sysfs("0-1\n", &[(0, "0-1\n")]);
        let t = Topology::read(d.path()).unwrap();
        assert_eq!(t.nodes, vec![Node { id: 0, cpus: vec![0, 1] }]);
        assert_eq!(t.assign(3), vec![(0, 0), (1, 0), (0, 0)]);
    }

    #[test]
    fn two_nodes_alternate() {
        let d = fake_sysfs("0-7\n", &[(1, "4-7\n"), (0, "0-3\n")]);
        let t = Topology::read(d.path()).unwrap();
        assert_eq!(t.nodes.len(), 2);
        assert_eq!(t.nodes[1], Node { id: 1, cpus: vec![4, 5, 6, 7] });
        assert_eq!(t.assign(4), vec![(0, 0), (4, 1), (1, 0), (5, 1)]);
    }

    #[test]
    fn offline_cpus_and_empty_nodes_are_dropped() {
        let d = fake_sysfs("0,2-3,6\n", &[(0, "0-3"), (1, "4-5"), (2, "6-7")]);
        let t = Topology::read(d.path()).unwrap();
        assert_eq!(t.nodes, vec![Node { id: 0, cpus: vec![0, 2, 3] }, Node { id: 2, cpus: vec![6] }]);
        assert_eq!(t.cpu_count(), 4);
    }

    #[test]
    fn no_node_directory_means_one_node() {
        let d = fake_sysfs("0-2", &[]);
        let t = Topology::read(d.path()).unwrap();
        assert_eq!(t.nodes, vec![Node { id: 0, cpus: vec![0, 1, 2] }]);
    }
}

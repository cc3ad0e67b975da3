//! A Hierarchical Navigable Small World graph (Malkov & Yashunin, "Efficient and robust
//! approximate nearest neighbor search using Hierarchical Navigable Small World graphs",
//! IEEE TPAMI 42(4), 2018; arXiv:1603.09320): insertion (algorithm 1), layer search
//! (algorithm 2), neighbour selection by the heuristic (algorithm 4, without extending or
//! keeping pruned candidates), and k-NN search (algorithm 5) with a filter hook.
//!
//! The graph holds node numbers only (`u32`, the collection's slots); vectors live in the
//! collection's flat array and are passed in. Layer 0 is one flat array of `2·m` links per
//! node; upper layers (about 1/m of the nodes) are small vectors. Distance is `1 - a·b` on
//! L2-normalised vectors. Levels come from a seeded SplitMix64 stream, so a build from the
//! same inserts gives the same graph.

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use arches_core::search::SearchError;

use super::collection::dot;
use crate::codec::{Reader, Writer};

/// Highest layer (levels are drawn from a geometric law of ratio 1/m: above 16 is never
/// reached in practice).
const MAX_LEVEL: usize = 16;

/// A distance with a total order (`f32::total_cmp`).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Dist(f32);

impl Eq for Dist {}
impl PartialOrd for Dist {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Dist {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Per-thread scratch marks of visited nodes: a node is visited when its mark equals the
/// current epoch, so clearing is a counter increment.
struct Visited {
    marks: Vec<u32>,
    epoch: u32,
}

thread_local! {
    static VISITED: RefCell<Visited> = const { RefCell::new(Visited { marks: Vec::new(), epoch: 0 }) };
}

impl Visited {
    fn reset(&mut self, n: usize) {
        if self.marks.len() < n {
            self.marks.resize(n, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.marks.iter_mut().for_each(|m| *m = 0);
            self.epoch = 1;
        }
    }
    /// Marks `node`; returns whether it was unvisited.
    fn insert(&mut self, node: u32) -> bool {
        let mark = &mut self.marks[node as usize];
        if *mark == self.epoch {
            false
        } else {
            *mark = self.epoch;
            true
        }
    }
}

/// The graph.
#[derive(Clone, Debug)]
pub struct Graph {
    m: usize,
    m0: usize,
    ef_construction: usize,
    level_mult: f64,
    rng: u64,
    levels: Vec<u8>,
    links0: Vec<u32>,
    len0: Vec<u16>,
    /// `upper[node][l - 1]`: links of `node` on layer `l ≥ 1`.
    upper: Vec<Vec<Vec<u32>>>,
    entry: Option<u32>,
    max_level: usize,
}

/// SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
/// OOPSLA 2014).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Graph {
    /// An empty graph with `m` links per upper-layer node (`2m` on layer 0) and build beam
    /// `ef_construction`.
    pub fn new(m: usize, ef_construction: usize) -> Self {
        let m = m.clamp(2, 128);
        Self {
            m,
            m0: 2 * m,
            ef_construction: ef_construction.max(1),
            level_mult: 1.0 / (m as f64).ln(),
            rng: 0x5EED_0FA2_C4E5,
            levels: Vec::new(),
            links0: Vec::new(),
            len0: Vec::new(),
            upper: Vec::new(),
            entry: None,
            max_level: 0,
        }
    }

    /// Links per node on upper layers.
    pub fn m(&self) -> usize {
        self.m
    }

    /// The build-time beam width.
    pub fn ef_construction(&self) -> usize {
        self.ef_construction
    }

    /// Nodes in the graph (including those the collection has deleted).
    pub fn len(&self) -> usize {
        self.levels.len()
    }

    /// Whether the graph has no node.
    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }

    fn links(&self, node: u32, layer: usize) -> &[u32] {
        if layer == 0 {
            let start = node as usize * self.m0;
            &self.links0[start..start + self.len0[node as usize] as usize]
        } else {
            &self.upper[node as usize][layer - 1]
        }
    }

    fn set_links(&mut self, node: u32, layer: usize, links: &[u32]) {
        if layer == 0 {
            let start = node as usize * self.m0;
            self.links0[start..start + links.len()].copy_from_slice(links);
            self.len0[node as usize] = links.len() as u16;
        } else {
            let slot = &mut self.upper[node as usize][layer - 1];
            slot.clear();
            slot.extend_from_slice(links);
        }
    }

    fn random_level(&mut self) -> usize {
        let bits = splitmix64(&mut self.rng) >> 11;
        let u = (bits as f64 + 0.5) / (1u64 << 53) as f64;
        ((-u.ln() * self.level_mult) as usize).min(MAX_LEVEL)
    }

    /// Inserts node `node` (must be `self.len()`, the next slot) whose vector is
    /// `vectors[node·dim..]`.
    pub fn insert(&mut self, node: u32, vectors: &[f32], dim: usize) {
        debug_assert_eq!(node as usize, self.levels.len());
        let level = self.random_level();
        self.levels.push(level as u8);
        self.links0.extend(std::iter::repeat_n(0, self.m0));
        self.len0.push(0);
        self.upper.push(vec![Vec::new(); level]);
        let Some(mut ep) = self.entry else {
            self.entry = Some(node);
            self.max_level = level;
            return;
        };
        let q = vector(vectors, dim, node);
        let mut ep_dist = 1.0 - dot(q, vector(vectors, dim, ep));
        for layer in (level + 1..=self.max_level).rev() {
            (ep, ep_dist) = self.greedy(q, ep, ep_dist, layer, vectors, dim);
        }
        let mut entry_points = vec![(ep_dist, ep)];
        for layer in (0..=level.min(self.max_level)).rev() {
            let found = self.search_layer(
                q,
                &entry_points,
                self.ef_construction,
                layer,
                vectors,
                dim,
                None,
            );
            let max = if layer == 0 { self.m0 } else { self.m };
            let chosen = self.select(&found, max, vectors, dim);
            self.set_links(node, layer, &chosen);
            for &neighbour in &chosen {
                self.link_back(neighbour, node, layer, max, vectors, dim);
            }
            entry_points = found;
        }
        if level > self.max_level {
            self.max_level = level;
            self.entry = Some(node);
        }
    }

    /// Adds `node` to the links of `neighbour` on `layer`, pruning by the heuristic when
    /// full.
    fn link_back(
        &mut self,
        neighbour: u32,
        node: u32,
        layer: usize,
        max: usize,
        vectors: &[f32],
        dim: usize,
    ) {
        let current = self.links(neighbour, layer);
        if current.contains(&node) {
            return;
        }
        if current.len() < max {
            let mut links = current.to_vec();
            links.push(node);
            self.set_links(neighbour, layer, &links);
            return;
        }
        let base = vector(vectors, dim, neighbour);
        let mut candidates: Vec<(f32, u32)> = current
            .iter()
            .chain(std::iter::once(&node))
            .map(|&c| (1.0 - dot(base, vector(vectors, dim, c)), c))
            .collect();
        candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let chosen = self.select(&candidates, max, vectors, dim);
        self.set_links(neighbour, layer, &chosen);
    }

    /// The neighbour-selection heuristic (algorithm 4): walking `candidates` (sorted by
    /// distance to the base, ascending), keep one only if it is closer to the base than to
    /// every one kept, up to `max`.
    fn select(
        &self,
        candidates: &[(f32, u32)],
        max: usize,
        vectors: &[f32],
        dim: usize,
    ) -> Vec<u32> {
        let mut kept: Vec<u32> = Vec::with_capacity(max);
        for &(d, c) in candidates {
            if kept.len() >= max {
                break;
            }
            let cv = vector(vectors, dim, c);
            if kept
                .iter()
                .all(|&r| 1.0 - dot(cv, vector(vectors, dim, r)) > d)
            {
                kept.push(c);
            }
        }
        kept
    }

    fn greedy(
        &self,
        q: &[f32],
        mut ep: u32,
        mut ep_dist: f32,
        layer: usize,
        vectors: &[f32],
        dim: usize,
    ) -> (u32, f32) {
        loop {
            let mut changed = false;
            for &c in self.links(ep, layer) {
                let d = 1.0 - dot(q, vector(vectors, dim, c));
                if d < ep_dist {
                    ep_dist = d;
                    ep = c;
                    changed = true;
                }
            }
            if !changed {
                return (ep, ep_dist);
            }
        }
    }

    /// Beam search of one layer (algorithm 2) from `entry_points` (distance, node): the
    /// `ef` nearest nodes found that `admit` accepts (all when `None`), ascending by
    /// distance. Rejected nodes are still traversed.
    #[allow(clippy::too_many_arguments)]
    fn search_layer(
        &self,
        q: &[f32],
        entry_points: &[(f32, u32)],
        ef: usize,
        layer: usize,
        vectors: &[f32],
        dim: usize,
        admit: Option<&dyn Fn(u32) -> bool>,
    ) -> Vec<(f32, u32)> {
        VISITED.with(|visited| {
            let mut visited = visited.borrow_mut();
            visited.reset(self.len());
            let mut candidates: BinaryHeap<Reverse<(Dist, u32)>> = BinaryHeap::new();
            let mut results: BinaryHeap<(Dist, u32)> = BinaryHeap::new();
            for &(d, ep) in entry_points {
                if visited.insert(ep) {
                    candidates.push(Reverse((Dist(d), ep)));
                    if admit.is_none_or(|a| a(ep)) {
                        results.push((Dist(d), ep));
                    }
                }
            }
            while results.len() > ef {
                results.pop();
            }
            while let Some(Reverse((Dist(d), c))) = candidates.pop() {
                if results.len() >= ef && results.peek().is_some_and(|w| d > w.0 .0) {
                    break;
                }
                for &n in self.links(c, layer) {
                    if !visited.insert(n) {
                        continue;
                    }
                    let dn = 1.0 - dot(q, vector(vectors, dim, n));
                    let worst = results.peek().map_or(f32::INFINITY, |w| w.0 .0);
                    if results.len() < ef || dn < worst {
                        candidates.push(Reverse((Dist(dn), n)));
                        if admit.is_none_or(|a| a(n)) {
                            results.push((Dist(dn), n));
                            if results.len() > ef {
                                results.pop();
                            }
                        }
                    }
                }
            }
            let mut out: Vec<(f32, u32)> = results.into_iter().map(|(d, n)| (d.0, n)).collect();
            out.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            out
        })
    }

    /// The (up to) `ef` admitted nodes nearest to `q` (algorithm 5), ascending by distance
    /// `1 - cosine`.
    pub fn search(
        &self,
        q: &[f32],
        ef: usize,
        vectors: &[f32],
        dim: usize,
        admit: Option<&dyn Fn(u32) -> bool>,
    ) -> Vec<(f32, u32)> {
        let Some(mut ep) = self.entry else {
            return Vec::new();
        };
        let mut ep_dist = 1.0 - dot(q, vector(vectors, dim, ep));
        for layer in (1..=self.max_level).rev() {
            (ep, ep_dist) = self.greedy(q, ep, ep_dist, layer, vectors, dim);
        }
        self.search_layer(q, &[(ep_dist, ep)], ef.max(1), 0, vectors, dim, admit)
    }

    /// Appends the graph to a snapshot.
    pub(crate) fn encode(&self, w: &mut Writer) {
        w.u64(self.m as u64);
        w.u64(self.ef_construction as u64);
        w.u64(self.rng);
        w.u64(self.entry.map_or(u64::MAX, u64::from));
        w.u64(self.max_level as u64);
        w.u64(self.levels.len() as u64);
        for node in 0..self.levels.len() {
            let level = self.levels[node] as usize;
            w.u8(level as u8);
            for layer in 0..=level {
                let links = self.links(node as u32, layer);
                w.u32(links.len() as u32);
                for &l in links {
                    w.u32(l);
                }
            }
        }
    }

    /// Reads a graph written by [`Graph::encode`], checking every link.
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, SearchError> {
        let m = r.u64()? as usize;
        let ef_construction = r.u64()? as usize;
        if !(2..=128).contains(&m) || ef_construction == 0 {
            return Err(r.corrupt("graph parameters out of range"));
        }
        let mut g = Graph::new(m, ef_construction);
        g.rng = r.u64()?;
        let entry = r.u64()?;
        g.max_level = r.u64()? as usize;
        let n = r.u64()? as usize;
        if n > u32::MAX as usize || g.max_level > MAX_LEVEL {
            return Err(r.corrupt("graph size out of range"));
        }
        g.entry = if entry == u64::MAX {
            None
        } else if (entry as usize) < n {
            Some(entry as u32)
        } else {
            return Err(r.corrupt("graph entry point out of range"));
        };
        g.levels.reserve(n);
        g.links0.reserve(n * g.m0);
        for node in 0..n {
            let level = r.u8()? as usize;
            if level > MAX_LEVEL {
                return Err(r.corrupt("node level out of range"));
            }
            g.levels.push(level as u8);
            g.links0.extend(std::iter::repeat_n(0, g.m0));
            g.len0.push(0);
            g.upper.push(vec![Vec::new(); level]);
            for layer in 0..=level {
                let count = r.u32()? as usize;
                let max = if layer == 0 { g.m0 } else { g.m };
                if count > max {
                    return Err(r.corrupt("too many links"));
                }
                let mut links = Vec::with_capacity(count);
                for _ in 0..count {
                    let l = r.u32()?;
                    if l as usize >= n {
                        return Err(r.corrupt("link out of range"));
                    }
                    links.push(l);
                }
                g.set_links(node as u32, layer, &links);
            }
        }
        if let Some(e) = g.entry {
            if g.levels[e as usize] as usize != g.max_level {
                return Err(r.corrupt("entry point is not on the top layer"));
            }
        }
        // Links must point at nodes present on their layer.
        for node in 0..n {
            for layer in 1..=g.levels[node] as usize {
                if g.upper[node][layer - 1]
                    .iter()
                    .any(|&l| (g.levels[l as usize] as usize) < layer)
                {
                    return Err(r.corrupt("link to a node absent from its layer"));
                }
            }
        }
        Ok(g)
    }

    /// Approximate bytes of memory the graph uses.
    pub fn memory_bytes(&self) -> usize {
        self.links0.len() * 4
            + self.len0.len() * 2
            + self.levels.len()
            + self.upper.len() * 24
            + self
                .upper
                .iter()
                .flatten()
                .map(|l| 24 + l.capacity() * 4)
                .sum::<usize>()
    }
}

fn vector(vectors: &[f32], dim: usize, node: u32) -> &[f32] {
    let start = node as usize * dim;
    &vectors[start..start + dim]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vector::normalized;

    fn data(n: usize, dim: usize) -> Vec<f32> {
        let mut state = 7u64;
        let mut out = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let v: Vec<f32> = (0..dim)
                .map(|_| (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                .collect();
            out.extend(normalized(&v));
        }
        out
    }

    #[test]
    fn finds_exact_neighbours_on_small_data_and_round_trips() {
        let (n, dim) = (1500, 8);
        let vectors = data(n, dim);
        let mut g = Graph::new(8, 64);
        for node in 0..n {
            g.insert(node as u32, &vectors, dim);
        }
        let mut hits = 0;
        for qi in 0..50u32 {
            let q = vector(&vectors, dim, qi * 7);
            let found = g.search(q, 32, &vectors, dim, None);
            assert_eq!(found[0].1, qi * 7);
            let mut exact: Vec<(f32, u32)> = (0..n as u32)
                .map(|i| (1.0 - dot(q, vector(&vectors, dim, i)), i))
                .collect();
            exact.sort_by(|a, b| a.0.total_cmp(&b.0));
            let want: Vec<u32> = exact[..10].iter().map(|e| e.1).collect();
            hits += found[..10].iter().filter(|f| want.contains(&f.1)).count();
        }
        assert!(hits >= 490, "recall {hits}/500");
        // Filter hook: only even nodes.
        let even = |n: u32| n.is_multiple_of(2);
        let found = g.search(vector(&vectors, dim, 3), 20, &vectors, dim, Some(&even));
        assert_eq!(found.len(), 20);
        assert!(found.iter().all(|f| f.1.is_multiple_of(2)));
        // Encode, decode: same answers.
        let mut w = Writer::default();
        g.encode(&mut w);
        let back = Graph::decode(&mut Reader::new(&w.bytes, "test")).unwrap();
        let q = vector(&vectors, dim, 11);
        assert_eq!(
            back.search(q, 16, &vectors, dim, None),
            g.search(q, 16, &vectors, dim, None)
        );
        // A link out of range is refused.
        let mut bad = w.bytes.clone();
        let len = bad.len();
        bad[len - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Graph::decode(&mut Reader::new(&bad, "test")).is_err());
    }
}

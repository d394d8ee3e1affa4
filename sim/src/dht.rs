//! DHT placement: which online servers are the k closest (XOR distance) to a key.
//!
//! Owns: the sorted table of server ids and the closest-k search over the online ones; the
//! survival probe (records placed once, never republished, checked later).
//! Must not: count load — the model counts messages; this module only answers "who holds it".

/// Servers sorted by their random 64-bit DHT id.
#[derive(Debug, Clone)]
pub struct ServerIndex {
    ids: Vec<(u64, u32)>,
}

impl ServerIndex {
    /// Builds the index from `(id, node)` pairs.
    pub fn new(mut ids: Vec<(u64, u32)>) -> ServerIndex {
        ids.sort_unstable();
        ServerIndex { ids }
    }

    /// Writes into `out` the (up to) `k` online servers closest to `key` by XOR distance.
    ///
    /// All ids sharing a longer prefix with `key` are closer than any id sharing a shorter one,
    /// and the ids sharing the top `L` bits form one contiguous run of the sorted table, so the
    /// search widens that run (L = 64, 63, …) until it holds k online servers, then sorts the run.
    pub fn closest_online(
        &self,
        key: u64,
        k: usize,
        online: impl Fn(u32) -> bool,
        out: &mut Vec<u32>,
    ) {
        out.clear();
        if self.ids.is_empty() || k == 0 {
            return;
        }
        let n = self.ids.len();
        // Start near the prefix length where a run holds about 2k servers.
        let mut len = 64u32.min(((n as f64 / (2 * k) as f64).max(1.0)).log2().floor() as u32);
        loop {
            let (lo, hi) = prefix_bounds(key, len);
            let a = self.ids.partition_point(|&(id, _)| id < lo);
            let b = self.ids.partition_point(|&(id, _)| id <= hi);
            let count = self.ids[a..b].iter().filter(|&&(_, nd)| online(nd)).count();
            if count >= k || len == 0 {
                let mut run: Vec<(u64, u32)> = self.ids[a..b]
                    .iter()
                    .filter(|&&(_, nd)| online(nd))
                    .map(|&(id, nd)| (id ^ key, nd))
                    .collect();
                run.sort_unstable();
                out.extend(run.iter().take(k).map(|&(_, nd)| nd));
                return;
            }
            len -= 1;
        }
    }
}

/// Smallest and largest id sharing the top `len` bits with `key`.
fn prefix_bounds(key: u64, len: u32) -> (u64, u64) {
    if len == 0 {
        return (0, u64::MAX);
    }
    if len >= 64 {
        return (key, key);
    }
    let low_mask = u64::MAX >> len;
    (key & !low_mask, key | low_mask)
}

/// Records placed for the survival check.
#[derive(Debug, Default, Clone)]
pub struct Probe {
    /// Holders per probe key: the `k` closest servers online at placement (fewer if fewer were).
    pub holders: Vec<Vec<u32>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn closest_matches_brute_force() {
        let mut r = Rng::from_seed(9);
        let ids: Vec<(u64, u32)> = (0..5000u32).map(|i| (r.next_u64(), i)).collect();
        let online: Vec<bool> = (0..5000).map(|_| r.chance(0.4)).collect();
        let idx = ServerIndex::new(ids.clone());
        let mut out = Vec::new();
        for _ in 0..200 {
            let key = r.next_u64();
            idx.closest_online(key, 20, |n| online[n as usize], &mut out);
            let mut brute: Vec<(u64, u32)> = ids
                .iter()
                .filter(|&&(_, n)| online[n as usize])
                .map(|&(id, n)| (id ^ key, n))
                .collect();
            brute.sort_unstable();
            let want: Vec<u32> = brute.iter().take(20).map(|&(_, n)| n).collect();
            assert_eq!(out, want);
        }
    }

    #[test]
    fn fewer_servers_than_k() {
        let idx = ServerIndex::new(vec![(5, 0), (9, 1), (1 << 63, 2)]);
        let mut out = Vec::new();
        idx.closest_online(7, 20, |n| n != 1, &mut out);
        assert_eq!(out, vec![0, 2]);
    }
}

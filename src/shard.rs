//! `--shard K/N`: the K-th (0-based) of N disjoint, contiguous, deterministic slices of a job's
//! items, so one big job spreads over a Slurm array or an indexed Kubernetes Job.

use std::ops::Range;
use std::str::FromStr;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// The items of `0..len` this shard owns; shards differ in size by at most one.
    pub fn range(&self, len: usize) -> Range<usize> {
        (self.index * len / self.count)..((self.index + 1) * len / self.count)
    }

    pub fn is_whole(&self) -> bool {
        self.count == 1
    }
}

impl FromStr for Shard {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (k, n) = s.split_once('/').with_context(|| format!("--shard {s}: expected K/N, e.g. 0/4"))?;
        let index: usize = k.trim().parse().with_context(|| format!("--shard {s}: K must be an integer"))?;
        let count: usize = n.trim().parse().with_context(|| format!("--shard {s}: N must be an integer"))?;
        if count == 0 || index >= count {
            bail!("--shard {s}: K counts from 0 and must be below N");
        }
        Ok(Self { index, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_everything_once() {
        for len in [0, 1, 7, 10, 50_000] {
            let mut next = 0;
            for k in 0..3 {
                let r = Shard { index: k, count: 3 }.range(len);
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, len);
        }
        assert_eq!("1/4".parse::<Shard>().unwrap(), Shard { index: 1, count: 4 });
        assert!("4/4".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
    }
}

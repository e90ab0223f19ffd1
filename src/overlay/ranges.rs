//! A set of disjoint, non-adjacent byte ranges: which bytes of a file the overlay owns.

use std::collections::BTreeMap;
use std::ops::Range;

/// Disjoint half-open ranges, merged on insert (adjacent ranges coalesce).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Total bytes covered.
    pub fn bytes(&self) -> u64 {
        self.map.iter().map(|(s, e)| e - s).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.map.iter().map(|(&s, &e)| s..e)
    }

    pub fn insert(&mut self, r: Range<u64>) {
        if r.start >= r.end {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        // Absorb a range that starts before and reaches `start`.
        if let Some((&s, &e)) = self.map.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.map.remove(&s);
            }
        }
        // Absorb every range starting inside [start, end].
        let inside: Vec<u64> = self.map.range(start..=end).map(|(&s, _)| s).collect();
        for s in inside {
            let e = self.map.remove(&s).expect("present");
            end = end.max(e);
        }
        self.map.insert(start, end);
    }

    /// Drop everything at or beyond `limit`.
    pub fn truncate(&mut self, limit: u64) {
        let beyond: Vec<u64> = self.map.range(limit..).map(|(&s, _)| s).collect();
        for s in beyond {
            self.map.remove(&s);
        }
        if let Some((&s, e)) = self.map.range_mut(..limit).next_back() {
            if *e > limit {
                *e = limit;
            }
            debug_assert!(s < *e);
        }
    }

    /// Split `r` into pieces in order, each tagged with whether the set covers it.
    pub fn split(&self, r: Range<u64>) -> Vec<(Range<u64>, bool)> {
        let mut out = Vec::new();
        let mut pos = r.start;
        let first = self
            .map
            .range(..=r.start)
            .next_back()
            .filter(|(_, e)| **e > r.start)
            .map(|(&s, &e)| (s, e));
        let rest = self.map.range(r.start + 1..r.end.max(r.start + 1));
        for (s, e) in first.into_iter().chain(rest.map(|(&s, &e)| (s, e))) {
            if pos >= r.end {
                break;
            }
            let s = s.max(pos);
            if s > pos {
                out.push((pos..s.min(r.end), false));
            }
            let e = e.min(r.end);
            if s < e {
                out.push((s..e, true));
                pos = e;
            }
        }
        if pos < r.end {
            out.push((pos..r.end, false));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_merges_overlaps_and_neighbours() {
        let mut s = RangeSet::new();
        s.insert(10..20);
        s.insert(30..40);
        s.insert(20..25);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![10..25, 30..40]);
        s.insert(5..35);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![5..40]);
        s.insert(50..50);
        assert_eq!(s.len(), 1);
        assert_eq!(s.bytes(), 35);
    }

    #[test]
    fn truncate_cuts_and_drops() {
        let mut s = RangeSet::new();
        s.insert(0..10);
        s.insert(20..30);
        s.truncate(25);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0..10, 20..25]);
        s.truncate(20);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0..10]);
        s.truncate(0);
        assert!(s.is_empty());
    }

    #[test]
    fn split_tags_covered_pieces() {
        let mut s = RangeSet::new();
        s.insert(10..20);
        s.insert(30..40);
        assert_eq!(
            s.split(0..50),
            vec![
                (0..10, false),
                (10..20, true),
                (20..30, false),
                (30..40, true),
                (40..50, false)
            ]
        );
        assert_eq!(
            s.split(15..35),
            vec![(15..20, true), (20..30, false), (30..35, true)]
        );
        assert_eq!(s.split(12..18), vec![(12..18, true)]);
        assert_eq!(s.split(20..30), vec![(20..30, false)]);
        assert_eq!(s.split(5..5), vec![]);
    }
}

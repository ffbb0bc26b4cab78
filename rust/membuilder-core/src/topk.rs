//! Bounded best-first candidate lists shared by the scan kernels and the searches: the one
//! ranking rule ([`ranks_before`]: score descending, then key ascending), [`TopK`] and
//! [`NearTop`]. Kept apart from [`crate::retrieval`] so that the kernels it calls can use them
//! without depending on it back.

/// `a` ranks before `b`: higher score, or equal score and smaller key.
#[inline]
pub fn ranks_before(a: (f32, u64), b: (f32, u64)) -> bool {
    a.0 > b.0 || (a.0 == b.0 && a.1 < b.1)
}

/// Bounded best-first list of `(score, key)`.
#[derive(Clone, Debug)]
pub struct TopK {
    cap: usize,
    items: Vec<(f32, u64)>,
}

impl TopK {
    pub fn new(cap: usize) -> Self {
        TopK {
            cap,
            items: Vec::with_capacity(cap.min(1024)),
        }
    }

    /// Whether `(score, key)` would enter the list (cheap pre-check before other tests).
    #[inline]
    pub fn admits(&self, score: f32, key: u64) -> bool {
        self.items.len() < self.cap || ranks_before((score, key), *self.items.last().unwrap())
    }

    #[inline]
    pub fn push(&mut self, score: f32, key: u64) {
        if self.cap == 0 || !self.admits(score, key) {
            return;
        }
        let pos = self
            .items
            .partition_point(|&x| ranks_before(x, (score, key)));
        self.items.insert(pos, (score, key));
        if self.items.len() > self.cap {
            self.items.pop();
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn into_vec(self) -> Vec<(f32, u64)> {
        self.items
    }
}

/// Candidates of one exact search: the best `k` (by kernel score, ties by key) and every other
/// candidate whose score is within `margin` of the `k`-th best (see [`crate::retrieval::kernel_margin`]).
///
/// Candidates are appended unsorted and the list is cut back (one selection, not a sort) every
/// few appends, which is when the admission [`NearTop::threshold`] rises: cheap per candidate,
/// with a threshold that lags the exact `k`-th score by at most a few candidates.
#[derive(Clone, Debug)]
pub struct NearTop {
    k: usize,
    margin: f32,
    items: Vec<(f32, u64)>,
    threshold: f32,
    next_cut: usize,
}

impl NearTop {
    pub fn new(k: usize, margin: f32) -> Self {
        NearTop {
            k,
            margin,
            items: Vec::new(),
            threshold: if k == 0 {
                f32::INFINITY
            } else {
                f32::NEG_INFINITY
            },
            next_cut: k.max(1) + 4,
        }
    }

    /// Lowest kernel score still worth offering (offer a score `>=` it).
    #[inline]
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Add a candidate whose score is `>=` [`NearTop::threshold`]; returns the new threshold.
    #[inline]
    pub fn push(&mut self, score: f32, key: u64) -> f32 {
        self.items.push((score, key));
        if self.items.len() >= self.next_cut {
            self.cut();
        }
        self.threshold
    }

    /// Add every candidate of `cands` at or above the threshold (another list's survivors).
    pub fn offer_all(&mut self, cands: impl IntoIterator<Item = (f32, u64)>) {
        for (score, key) in cands {
            if score >= self.threshold {
                self.push(score, key);
            }
        }
    }

    fn cut(&mut self) {
        if self.k == 0 || self.items.len() <= self.k {
            return;
        }
        self.items
            .select_nth_unstable_by(self.k - 1, |a, b| rank_order(*a, *b));
        let t = self.items[self.k - 1].0 - self.margin;
        self.items.retain(|x| x.0 >= t);
        self.threshold = t;
        // Cut again after four more, or, when many rows tie within the margin (duplicated texts),
        // after as many more as there are ties, so that cutting stays linear overall.
        self.next_cut = self.items.len() + (self.items.len().saturating_sub(self.k)).max(4);
    }

    /// The candidates, best first.
    pub fn into_vec(mut self) -> Vec<(f32, u64)> {
        self.cut();
        self.items.sort_unstable_by(|a, b| rank_order(*a, *b));
        self.items
    }
}

/// [`ranks_before`] as an ordering (better first).
#[inline]
pub fn rank_order(a: (f32, u64), b: (f32, u64)) -> std::cmp::Ordering {
    if ranks_before(a, b) {
        std::cmp::Ordering::Less
    } else if ranks_before(b, a) {
        std::cmp::Ordering::Greater
    } else {
        std::cmp::Ordering::Equal
    }
}

/// Merge best-first lists into the best `k`.
pub fn merge_topk(lists: impl IntoIterator<Item = Vec<(f32, u64)>>, k: usize) -> Vec<(f32, u64)> {
    let mut all: Vec<(f32, u64)> = lists.into_iter().flatten().collect();
    all.sort_by(|a, b| rank_order(*a, *b));
    all.truncate(k);
    all
}

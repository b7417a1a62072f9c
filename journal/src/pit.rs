//! Points in time: what a group's journal holds (from the segment indexes, never by reading
//! payloads), how a user's `--at` resolves to a seq, and for a seq, where each byte of each disk
//! comes from (the newest record at or before it that covers the byte, else the base).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::record::Kind;
use crate::segment::IndexEntry;
use crate::store::{GroupDir, GroupMeta, SeqMark};

mod clock;
pub use clock::{format_time, parse_rfc3339};

/// A recovery point as a user names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Point {
    Latest,
    Seq(u64),
    Bookmark(String),
    /// Unix time in nanoseconds: the last record at or before it.
    Time(u64),
}

/// Parses `latest`, `seq:N`, `bookmark:NAME`, an RFC 3339 UTC time (`2026-11-22T10:15:03Z`,
/// fractions allowed) or a relative time (`-5m`, `-90s`) against `now_ns`.
pub fn parse_point(s: &str, now_ns: u64) -> Result<Point, String> {
    let s = s.trim();
    if s == "latest" {
        return Ok(Point::Latest);
    }
    if let Some(n) = s.strip_prefix("seq:") {
        return n
            .parse()
            .map(Point::Seq)
            .map_err(|_| format!("{s:?}: seq:N needs a number"));
    }
    if let Some(name) = s.strip_prefix("bookmark:") {
        if name.is_empty() {
            return Err("bookmark: needs a name".into());
        }
        return Ok(Point::Bookmark(name.to_owned()));
    }
    if let Some(rel) = s.strip_prefix('-') {
        let d = crate::units::parse_duration(rel)?;
        return Ok(Point::Time(now_ns.saturating_sub(d.as_nanos() as u64)));
    }
    parse_rfc3339(s).map(Point::Time).ok_or_else(|| {
        format!(
            "{s:?} is not a point: use latest, seq:N, bookmark:NAME, a UTC time such as \
             2026-11-22T10:15:03Z, or a relative time such as -5m"
        )
    })
}

#[derive(Debug, Clone)]
pub struct Segment {
    pub path: PathBuf,
    pub first_seq: u64,
    pub entries: Vec<IndexEntry>,
    /// Open for reading (a descriptor, or a bucket's object through a cache).
    pub file: crate::read::SegmentFile,
}

/// A sealed segment read from elsewhere than a group directory (a bucket): its index and its
/// bytes, and its bookmarks when they are known (else they are read from it).
#[derive(Debug)]
pub struct Sealed {
    pub segment: Segment,
    pub bookmarks: Option<Vec<Bookmark>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bookmark {
    pub name: String,
    pub seq: u64,
    pub time_ns: u64,
}

/// Seqs `start..end` are not consistent points (a seed or resync was running); `end` is None
/// while it still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Window {
    pub start: u64,
    pub end: Option<u64>,
    pub start_time_ns: u64,
    pub end_time_ns: Option<u64>,
}

/// A group's history as its indexes describe it.
#[derive(Debug, Clone)]
pub struct History {
    pub meta: GroupMeta,
    pub base: SeqMark,
    pub segments: Vec<Segment>,
    pub last_seq: u64,
    pub last_time_ns: u64,
    pub bookmarks: Vec<Bookmark>,
    pub flushes: u64,
    pub last_flush: Option<(u64, u64)>,
    pub inconsistent: Vec<Window>,
    /// A record that does not read back although the journal holds it durably: the history
    /// ends before it, and points after it are refused.
    pub damage: Option<crate::read::Corrupt>,
    /// A retention fold under way (or interrupted): points before its end are gone.
    pub fold: Option<crate::store::FoldMark>,
}

#[derive(Debug, thiserror::Error)]
pub enum PointError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("seq {seq} is before the oldest point of group {group} (seq {oldest}, {oldest_time}); retention has folded older history into the base")]
    BeforeWindow {
        group: String,
        seq: u64,
        oldest: u64,
        oldest_time: String,
    },
    #[error("{what} is after the newest point of group {group} (seq {newest}, {newest_time})")]
    AfterWindow {
        group: String,
        what: String,
        newest: u64,
        newest_time: String,
    },
    #[error(
        "time {time} is before the oldest point of group {group} ({oldest_time}, seq {oldest})"
    )]
    TimeBeforeWindow {
        group: String,
        time: String,
        oldest: u64,
        oldest_time: String,
    },
    #[error("seq {seq} of group {group} is inside a {window} window (seq {start}..{end}), so the disks there are not a consistent state; the nearest consistent points are {before} and {after}")]
    Inconsistent {
        group: String,
        seq: u64,
        window: &'static str,
        start: u64,
        end: String,
        before: String,
        after: String,
    },
    #[error("{what} of group {group} is past a damaged record: {damage}; restore can serve points up to seq {last} (run `replicator check`)")]
    Damaged {
        group: String,
        what: String,
        damage: String,
        last: u64,
    },
    #[error("group {group} has no bookmark {name:?}; bookmarks: {known}")]
    UnknownBookmark {
        group: String,
        name: String,
        known: String,
    },
}

impl History {
    /// Reads the group's metadata and every segment's index (scanning the newest, unsealed one).
    /// A record that does not read back where the journal is durable ends the history there
    /// ([`History::damage`]); a torn end of the segment being written just ends it.
    pub fn load(dir: &GroupDir) -> io::Result<History> {
        let meta = dir.meta()?;
        let base = dir.mark("base")?;
        let fold = dir.fold_mark()?.filter(|f| f.to > base.seq);
        // Read before the segments: the files hold at least what it names.
        let durable_seq = dir.checkpoint()?.map(|c| c.last_seq);
        let mut h = History::empty(meta, base, fold);
        let mut open: Option<Window> = None;
        let segments = dir.segments()?;
        let count = segments.len();
        for (i, seg) in segments.into_iter().enumerate() {
            let (mut entries, scan) = match seg.load_index() {
                Ok(loaded) => loaded,
                // Gone since the listing (a fold finished): the caller reads again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
                Err(e) => {
                    h.end_at_damage(crate::read::Corrupt {
                        path: seg.path.clone(),
                        pos: 0,
                        seq: h.last_seq + 1,
                        why: e.to_string(),
                    });
                    break;
                }
            };
            let mut stop = None;
            if let Some(scan) = scan {
                // No index: what is valid of it. Past the durable position (or in the segment
                // being written, when no checkpoint exists) a bad end is a torn tail, not history;
                // before it, it is damage.
                entries.truncate(scan.entries.len());
                if let Some((pos, why)) = scan.stop {
                    let next = entries.last().map_or(seg.first_seq, |e| e.seq + 1);
                    let durable = match durable_seq {
                        Some(d) => next <= d,
                        None => i + 1 < count,
                    };
                    if durable {
                        stop = Some(crate::read::Corrupt {
                            path: seg.path.clone(),
                            pos,
                            seq: next,
                            why: why.to_string(),
                        });
                    }
                }
            }
            let file = crate::read::SegmentFile::open(&seg.path)?;
            h.push(
                Segment {
                    path: seg.path.clone(),
                    first_seq: seg.first_seq,
                    entries,
                    file,
                },
                None,
                &mut open,
            )?;
            if let Some(c) = stop {
                h.end_at_damage(c);
                break;
            }
        }
        if let Some(w) = open {
            h.inconsistent.push(w);
        }
        Ok(h)
    }

    /// The history of sealed segments that follow `base` (a store in a bucket: no fold under
    /// way, nothing torn).
    pub fn sealed(meta: GroupMeta, base: SeqMark, segments: Vec<Sealed>) -> io::Result<History> {
        let mut h = History::empty(meta, base, None);
        let mut open = None;
        for s in segments {
            h.push(s.segment, s.bookmarks, &mut open)?;
        }
        if let Some(w) = open {
            h.inconsistent.push(w);
        }
        Ok(h)
    }

    fn empty(meta: GroupMeta, base: SeqMark, fold: Option<crate::store::FoldMark>) -> History {
        History {
            meta,
            base,
            segments: Vec::new(),
            last_seq: base.seq,
            last_time_ns: base.time_ns,
            bookmarks: Vec::new(),
            flushes: 0,
            last_flush: None,
            inconsistent: Vec::new(),
            damage: None,
            fold,
        }
    }

    /// Adds the next segment: its entries after the base, which must follow the history's
    /// last seq. Bookmarks come from `bookmarks` when given, else from the segment.
    fn push(
        &mut self,
        mut seg: Segment,
        bookmarks: Option<Vec<Bookmark>>,
        open: &mut Option<Window>,
    ) -> io::Result<()> {
        seg.entries.retain(|e| e.seq > self.base.seq);
        let known = bookmarks.is_some();
        if let Some(b) = bookmarks {
            self.bookmarks
                .extend(b.into_iter().filter(|b| b.seq > self.base.seq));
        }
        for e in &seg.entries {
            if e.seq != self.last_seq + 1 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: seq {} follows seq {}: records are missing",
                        seg.path.display(),
                        e.seq,
                        self.last_seq
                    ),
                ));
            }
            self.last_seq = e.seq;
            self.last_time_ns = e.time_ns;
            self.note(e, (!known).then_some(&seg.file), open);
        }
        self.segments.push(seg);
        Ok(())
    }

    /// The history ends before a record that does not read back where the journal is durable.
    fn end_at_damage(&mut self, c: crate::read::Corrupt) {
        tracing::warn!(
            "{c}; the history of group {} ends at seq {} (run `replicator check`)",
            self.meta.name,
            self.last_seq
        );
        self.damage = Some(c);
    }

    /// Takes note of one entry: flushes, bookmarks (their names read from `file`, unless they
    /// are known), windows.
    fn note(
        &mut self,
        e: &IndexEntry,
        file: Option<&crate::read::SegmentFile>,
        open: &mut Option<Window>,
    ) {
        match e.kind {
            Kind::Flush => {
                self.flushes += 1;
                self.last_flush = Some((e.seq, e.time_ns));
            }
            Kind::Bookmark => {
                let Some(file) = file else { return };
                let mut buf = Vec::new();
                match file.read(e, &mut buf) {
                    Ok(r) => self.bookmarks.push(Bookmark {
                        name: r.text(),
                        seq: e.seq,
                        time_ns: e.time_ns,
                    }),
                    // A bookmark holds no disk bytes: its point stays, its name is lost.
                    Err(err) => tracing::warn!("bookmark at seq {} is unreadable: {err}", e.seq),
                }
            }
            Kind::SyncBegin if open.is_none() => {
                *open = Some(Window {
                    start: e.seq,
                    end: None,
                    start_time_ns: e.time_ns,
                    end_time_ns: None,
                });
            }
            Kind::SyncEnd => {
                let mut w = open.take().unwrap_or(Window {
                    // The begin was folded into the base: the base is inside the window.
                    start: self.base.seq,
                    end: None,
                    start_time_ns: self.base.time_ns,
                    end_time_ns: None,
                });
                w.end = Some(e.seq);
                w.end_time_ns = Some(e.time_ns);
                self.inconsistent.push(w);
            }
            _ => {}
        }
    }

    /// The oldest point: the base, or the end of a fold under way.
    pub fn oldest_seq(&self) -> u64 {
        self.fold.map_or(self.base.seq, |f| f.to.max(self.base.seq))
    }

    /// Time of the oldest point: the base's, or the first record's when nothing was folded.
    pub fn oldest_time_ns(&self) -> u64 {
        if let Some(f) = self.fold {
            return f.to_time_ns;
        }
        if self.base.seq > 0 {
            return self.base.time_ns;
        }
        self.segments
            .iter()
            .find_map(|s| s.entries.first())
            .map_or(self.base.time_ns, |e| e.time_ns)
    }

    /// Time of the record at `seq` (the base's time for the base seq).
    pub fn time_of(&self, seq: u64) -> u64 {
        if seq <= self.base.seq {
            return self.base.time_ns;
        }
        self.entry(seq).map_or(0, |(_, e)| e.time_ns)
    }

    /// The index entry of `seq` and its segment's position in `segments`.
    pub fn entry(&self, seq: u64) -> Option<(usize, &IndexEntry)> {
        let i = self
            .segments
            .partition_point(|s| s.entries.first().is_some_and(|e| e.seq <= seq))
            .checked_sub(1)?;
        let seg = &self.segments[i];
        let first = seg.entries.first()?.seq;
        seg.entries.get((seq - first) as usize).map(|e| (i, e))
    }

    fn window_of(&self, seq: u64) -> Option<&Window> {
        self.inconsistent
            .iter()
            .find(|w| seq >= w.start && w.end.is_none_or(|end| seq < end))
    }

    pub fn is_consistent(&self, seq: u64) -> bool {
        self.window_of(seq).is_none()
    }

    /// Resolves a point to a seq, refusing points outside the window or not consistent.
    // The error is built once per command line; its size does not matter.
    #[allow(clippy::result_large_err)]
    pub fn resolve(&self, point: &Point) -> Result<u64, PointError> {
        let group = self.meta.name.clone();
        if let Some(d) = &self.damage {
            // The newest point, or a time past the last readable record, lies beyond it.
            let beyond = match point {
                Point::Latest => Some("the latest point".to_owned()),
                Point::Time(t) if *t > self.last_time_ns => {
                    Some(format!("time {}", format_time(*t)))
                }
                _ => None,
            };
            if let Some(what) = beyond {
                return Err(PointError::Damaged {
                    group,
                    what,
                    damage: d.to_string(),
                    last: self.last_seq,
                });
            }
        }
        let seq = match point {
            Point::Latest => {
                // The newest consistent point.
                let mut s = self.last_seq;
                if let Some(w) = self.window_of(s) {
                    s = w.start.saturating_sub(1).max(self.base.seq);
                }
                s
            }
            Point::Seq(n) => *n,
            Point::Bookmark(name) => match self.bookmarks.iter().rev().find(|b| b.name == *name) {
                Some(b) => b.seq,
                None => {
                    let known = if self.bookmarks.is_empty() {
                        "none".to_owned()
                    } else {
                        self.bookmarks
                            .iter()
                            .map(|b| b.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    return Err(PointError::UnknownBookmark {
                        group,
                        name: name.clone(),
                        known,
                    });
                }
            },
            Point::Time(t) => {
                let t = *t;
                let oldest_time = match self.oldest_time_ns() {
                    0 => u64::MAX,
                    t => t,
                };
                if t < oldest_time {
                    return Err(PointError::TimeBeforeWindow {
                        group,
                        time: format_time(t),
                        oldest: self.oldest_seq(),
                        oldest_time: format_time(oldest_time.min(self.last_time_ns)),
                    });
                }
                if t > crate::now_ns() + 1_000_000_000 {
                    return Err(PointError::AfterWindow {
                        group,
                        what: format!("time {} (in the future)", format_time(t)),
                        newest: self.last_seq,
                        newest_time: format_time(self.last_time_ns),
                    });
                }
                self.last_at_or_before(t)
            }
        };
        if seq < self.oldest_seq() {
            return Err(PointError::BeforeWindow {
                group,
                seq,
                oldest: self.oldest_seq(),
                oldest_time: format_time(self.oldest_time_ns()),
            });
        }
        if let Some(d) = self.damage.as_ref().filter(|_| seq > self.last_seq) {
            return Err(PointError::Damaged {
                group,
                what: format!("seq {seq}"),
                damage: d.to_string(),
                last: self.last_seq,
            });
        }
        if seq > self.last_seq {
            return Err(PointError::AfterWindow {
                group,
                what: format!("seq {seq}"),
                newest: self.last_seq,
                newest_time: format_time(self.last_time_ns),
            });
        }
        if let Some(w) = self.window_of(seq) {
            let before = if w.start > self.oldest_seq() {
                format!("seq:{}", w.start - 1)
            } else {
                "none before it".into()
            };
            let after = w.end.map_or_else(
                || "none yet (it is still running)".into(),
                |e| format!("seq:{e}"),
            );
            return Err(PointError::Inconsistent {
                group,
                seq,
                window: "seed/resync",
                start: w.start,
                end: w
                    .end
                    .map_or_else(|| "still running".into(), |e| e.to_string()),
                before,
                after,
            });
        }
        Ok(seq)
    }

    /// The last seq whose record time is at or before `t` (the base seq if none).
    fn last_at_or_before(&self, t: u64) -> u64 {
        let mut best = self.base.seq;
        for s in &self.segments {
            let Some(first) = s.entries.first() else {
                continue;
            };
            if first.time_ns > t {
                break;
            }
            let i = s.entries.partition_point(|e| e.time_ns <= t);
            if i > 0 {
                best = s.entries[i - 1].seq;
            }
        }
        best
    }

    /// Where every byte of every disk comes from at `seq`.
    pub fn view(&self, seq: u64) -> Vec<DiskMap> {
        self.changes(seq)
            .iter()
            .map(|c| DiskMap::build(c))
            .collect()
    }

    /// Like [`History::view`], but frees the history's index entries before the maps are
    /// built, which lowers peak memory for long journals.
    pub fn into_view(mut self, seq: u64) -> Vec<DiskMap> {
        let changes = self.changes(seq);
        self.segments = Vec::new();
        drop(self);
        changes.iter().map(|c| DiskMap::build(c)).collect()
    }

    /// Per disk, the changes up to `seq` in seq order: (start, end, source).
    fn changes(&self, seq: u64) -> Vec<Vec<(u64, u64, Source)>> {
        let mut changes: Vec<Vec<(u64, u64, Source)>> =
            self.meta.volumes.iter().map(|_| Vec::new()).collect();
        'segments: for (si, s) in self.segments.iter().enumerate() {
            for e in &s.entries {
                if e.seq > seq {
                    break 'segments;
                }
                if !e.kind.changes_data() || e.length == 0 {
                    continue;
                }
                let Some(list) = changes.get_mut(usize::from(e.disk)) else {
                    continue;
                };
                let source = if e.kind.carries_data() {
                    Source::Record {
                        segment: si as u32,
                        len: (e.end() - e.pos) as u32,
                        pos: e.pos,
                        skip: 0,
                    }
                } else {
                    Source::Zero
                };
                list.push((e.offset, e.offset + e.length, source));
            }
        }
        changes
    }
}

/// Where a range of a disk's bytes comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The base image (no record covers it).
    Base,
    /// Zeroed or trimmed.
    Zero,
    /// The payload of the record at `pos` in segment `segment` (`len` bytes with its header),
    /// from byte `skip` of it.
    Record {
        segment: u32,
        len: u32,
        pos: u64,
        skip: u64,
    },
}

impl Source {
    fn advanced(self, by: u64) -> Source {
        match self {
            Source::Record {
                segment,
                len,
                pos,
                skip,
            } => Source::Record {
                segment,
                len,
                pos,
                skip: skip + by,
            },
            other => other,
        }
    }
}

/// Non-overlapping ranges of one disk and their sources, sorted; gaps come from the base.
/// Built once per point ([`DiskMap::build`]) and then only read.
#[derive(Debug, Clone, Default)]
pub struct DiskMap {
    starts: Vec<u64>,
    /// (end, source) of the range at the same index of `starts`
    pieces: Vec<(u64, Source)>,
}

impl DiskMap {
    /// The map of `changes` (start, end, source), applied in order: where they overlap, the
    /// later one wins. A sweep over the sorted ends with a heap of the ranges covering the
    /// sweep point, newest on top: O(n log n), no per-change tree updates.
    pub fn build(changes: &[(u64, u64, Source)]) -> DiskMap {
        use std::collections::BinaryHeap;
        let mut events: Vec<(u64, u32)> = Vec::with_capacity(changes.len() * 2);
        for (i, &(start, end, _)) in changes.iter().enumerate() {
            if start < end {
                events.push((start, i as u32));
                events.push((end, i as u32));
            }
        }
        events.sort_unstable_by_key(|e| e.0);
        let mut active: BinaryHeap<u32> = BinaryHeap::new();
        let mut ended = vec![false; changes.len()];
        let mut map = DiskMap::default();
        let mut k = 0;
        while k < events.len() {
            let pos = events[k].0;
            while k < events.len() && events[k].0 == pos {
                let i = events[k].1;
                let (start, _, _) = changes[i as usize];
                // Each change has one event at its start and one at its (greater) end.
                if start == pos {
                    active.push(i);
                } else {
                    ended[i as usize] = true;
                }
                k += 1;
            }
            while active.peek().is_some_and(|&top| ended[top as usize]) {
                active.pop();
            }
            let Some(&top) = active.peek() else {
                continue;
            };
            let next = events.get(k).map_or(pos, |e| e.0);
            if next <= pos {
                continue;
            }
            let (start, _, source) = changes[top as usize];
            let source = source.advanced(pos - start);
            // Extend the previous piece when it continues the same change.
            if let (Some(&last_start), Some(last)) = (map.starts.last(), map.pieces.last_mut()) {
                if last.0 == pos
                    && last.1.advanced(pos - last_start) == source
                    && source != Source::Base
                {
                    last.0 = next;
                    continue;
                }
            }
            map.starts.push(pos);
            map.pieces.push((next, source));
        }
        map
    }

    /// The pieces covering `offset..offset+length`, in order, gaps as `Base`.
    pub fn lookup(&self, offset: u64, length: u64, out: &mut Vec<(u64, u64, Source)>) {
        out.clear();
        let end = offset + length;
        let mut at = offset;
        // The first range that ends after `offset`.
        let mut i = self
            .starts
            .partition_point(|&s| s <= offset)
            .saturating_sub(1);
        if self.pieces.get(i).is_some_and(|p| p.0 <= offset) {
            i += 1;
        }
        while i < self.starts.len() && self.starts[i] < end {
            let (s, (e, src)) = (self.starts[i], self.pieces[i]);
            if s > at {
                out.push((at, s - at, Source::Base));
                at = s;
            }
            let piece_end = e.min(end);
            if piece_end > at {
                out.push((at, piece_end - at, src.advanced(at - s)));
                at = piece_end;
            }
            i += 1;
        }
        if at < end {
            out.push((at, end - at, Source::Base));
        }
    }

    pub fn ranges(&self) -> usize {
        self.starts.len()
    }
}

/// Relative points are measured from now.
pub fn relative(d: Duration) -> Point {
    Point::Time(crate::now_ns().saturating_sub(d.as_nanos() as u64))
}

#[cfg(test)]
mod tests;

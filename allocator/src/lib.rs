//! rotor's allocator: owns the pool of source addresses and the rotation
//! cursor, refreshes the pool from its sources, and hands out leases to
//! workers over a Unix socket, one at a time, so the rotation order is global
//! across every worker process.
#![forbid(unsafe_code)]

pub mod access;
pub mod metadata;
pub mod metrics;
pub mod persist;
pub mod pool;
pub mod reach;
pub mod server;
pub mod sessions;
pub mod sites;
pub mod source;
pub mod spec;

/// Resident memory of this process now, in bytes (the ignored tests that
/// measure what an entry costs).
#[cfg(test)]
pub(crate) fn rss() -> usize {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    s.split(' ').nth(1).unwrap().parse::<usize>().unwrap() * 4096
}
pub mod state;
pub mod tickets;
pub mod usable;
pub mod waiters;

/// A peer's text as kept to be shown (`rotor status`, the log): its
/// control characters escaped (a newline as `\n`, ESC as `\u{1b}`: a
/// peer's newline would forge a line of the status or the log, an escape
/// sequence drive the operator's terminal), then cut to `max` bytes at a
/// character's boundary, with a `…` after a cut.
pub(crate) fn shown(mut text: String, max: usize) -> String {
    // Cut first (a peer's megabytes are not escaped whole), then again
    // once escaped.
    cut_at(&mut text, max);
    let mut text = match text.chars().any(char::is_control) {
        false => text,
        true => text
            .chars()
            .flat_map(|c| {
                let escaped = c.is_control().then(|| c.escape_debug());
                let plain = (!c.is_control()).then_some(c);
                escaped.into_iter().flatten().chain(plain)
            })
            .collect(),
    };
    cut_at(&mut text, max);
    text
}

/// `text` cut to `max` bytes at a character's boundary, with a `…` after
/// a cut (a text already cut, ending in one, is left).
fn cut_at(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
}

/// Whether `period` has passed since `last` (or nothing was done yet),
/// noting `now` as the last time when it has: a pass or a warning at most
/// once a period.
pub(crate) fn due(
    last: &mut Option<std::time::Instant>,
    now: std::time::Instant,
    period: std::time::Duration,
) -> bool {
    let due = last.is_none_or(|t| now.saturating_duration_since(t) >= period);
    if due {
        *last = Some(now);
    }
    due
}

pub use server::{
    bind_socket, listened_on, not_a_socket, run, socket_dir, socket_dir_unmade, BindError, Config,
    RunError,
};

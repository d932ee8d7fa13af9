//! Points in an archive's history as the commands' flags name them: a
//! revision or a moment (`--revision`/`--time` of `restore` and `export`,
//! `--from`/`--to` of `history` and `diff`), parsed in one way and placed on
//! a revision in one way; and the one rule for whether an archive is
//! current ([`Currency`]), which `list` shows and a moment after the
//! archive's newest one relies on.

use std::time::Duration;

use etcdpitr_common::layout::GenerationId;
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::store::Archive;
use etcdpitr_common::Revision;

use crate::source::{self, TimeChoice};
use crate::{format_ms, UsageError};

/// Default `--max-staleness`: how old the archive's newest vouched moment
/// may be for the archive to count as current. The archiver seals idle
/// progress every `--idle-interval` (1 m by default) and a busy chain's
/// segments every few seconds, so a healthy archive is never older than
/// about 1 m; 2 m leaves room for one late seal.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_mins(2);

/// How a command reads times: the moment `now` means (read once per
/// command), whether an RFC 3339 time without a zone is UTC (`--utc`), and
/// how stale a current archive may be (`--max-staleness`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeRules {
    /// "Now", Unix milliseconds.
    pub now_ms: i64,
    /// `--utc`: a time without a zone is read as UTC (else refused).
    pub utc: bool,
    /// `--max-staleness`, milliseconds.
    pub max_staleness_ms: i64,
}

impl TimeRules {
    /// The rules with `now` read from the system clock.
    pub fn now(utc: bool, max_staleness: Option<Duration>) -> Self {
        let staleness = max_staleness.unwrap_or(DEFAULT_MAX_STALENESS);
        Self {
            now_ms: chrono::Utc::now().timestamp_millis(),
            utc,
            max_staleness_ms: i64::try_from(staleness.as_millis()).unwrap_or(i64::MAX),
        }
    }

    /// How current an archive whose newest vouched moment is `vouched_ms`
    /// (Unix ms, 0: none) is now.
    pub fn currency(&self, vouched_ms: i64) -> Currency {
        let age_ms = self.now_ms.saturating_sub(vouched_ms);
        Currency {
            vouched_ms,
            age_ms,
            // A negative age is the restorer's clock behind the archiver's.
            current: vouched_ms > 0 && age_ms <= self.max_staleness_ms,
            max_staleness_ms: self.max_staleness_ms,
        }
    }

    /// What a moment after the newest vouched moment `vouched_ms` of the
    /// archive's newest generation resolves to: the newest revision when
    /// the archive is current and the moment is not in the future.
    pub fn after_newest(&self, time_ms: i64, vouched_ms: i64) -> AfterNewest {
        let currency = self.currency(vouched_ms);
        if time_ms > self.now_ms {
            AfterNewest::Future
        } else if currency.current {
            AfterNewest::Newest(currency)
        } else {
            AfterNewest::Stale(currency)
        }
    }
}

/// How current an archive is.
///
/// An archive is *current* when its newest generation vouches (a segment's
/// end time: a sealed revision or an idle progress mark) for a moment V no
/// more than `--max-staleness` before now: the archiver was then at the
/// source's newest revision and sealing on time. It cannot prove that no
/// write happened after V (the archiver seals those within its segment
/// age, or died), so a moment after V taken as "the newest revision" is
/// said so where it is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Currency {
    /// The newest moment vouched for (Unix ms, 0: none).
    pub vouched_ms: i64,
    /// Milliseconds from it to now (negative: the restorer's clock is
    /// behind the archiver's).
    pub age_ms: i64,
    /// Whether the archive is current.
    pub current: bool,
    /// The bound it was judged by (milliseconds).
    pub max_staleness_ms: i64,
}

impl Currency {
    /// `2026-…Z (12.345 s ago)`.
    pub fn describe_vouched(&self) -> String {
        format!(
            "{} ({} ago)",
            format_ms(self.vouched_ms),
            format_seconds(self.age_ms)
        )
    }

    /// `--max-staleness 2m`.
    pub fn describe_bound(&self) -> String {
        format!(
            "--max-staleness {}",
            humantime::format_duration(Duration::from_millis(
                self.max_staleness_ms.max(0).unsigned_abs()
            ))
        )
    }
}

/// What a moment after the archive's newest vouched moment resolves to
/// ([`TimeRules::after_newest`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterNewest {
    /// The archive's newest revision: the archive is current.
    Newest(Currency),
    /// Refused: the moment is after now.
    Future,
    /// Refused: the archive is not current.
    Stale(Currency),
}

/// Milliseconds as seconds, `12.345 s`.
pub fn format_seconds(ms: i64) -> String {
    let sign = if ms < 0 { "-" } else { "" };
    let abs = ms.unsigned_abs();
    format!("{sign}{}.{:03} s", abs / 1000, abs % 1000)
}

/// A revision, a moment to place on the last revision observed at or
/// before it, or the newest restorable revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Point {
    /// The newest restorable revision (of the generation given, else of the
    /// archive).
    Latest,
    /// A revision number.
    Revision(Revision),
    /// A moment.
    Time {
        /// Unix milliseconds.
        ms: i64,
        /// As given, for messages.
        text: String,
    },
}

impl Point {
    /// The point of `--revision N` or `--time T`; neither is the newest
    /// restorable revision.
    ///
    /// # Errors
    /// [`UsageError`] when both are given, or for a bad time.
    pub fn from_flags(
        revision: Option<Revision>,
        time: Option<&str>,
        rules: &TimeRules,
    ) -> Result<Self, UsageError> {
        match (revision, time) {
            (Some(r), None) => Ok(Self::Revision(r)),
            (None, Some(t)) => Self::time("--time", t, rules),
            (None, None) => Ok(Self::Latest),
            (Some(_), Some(_)) => Err(UsageError(
                "give at most one of --revision or --time".into(),
            )),
        }
    }

    /// The point of a flag that takes either, like `--from` and `--to`: a
    /// decimal revision number or a time ([`parse_time`]).
    ///
    /// # Errors
    /// [`UsageError`] naming `flag` when `text` is neither.
    pub fn parse(flag: &str, text: &str, rules: &TimeRules) -> Result<Self, UsageError> {
        if let Ok(r) = text.trim().parse::<Revision>() {
            return Ok(Self::Revision(r));
        }
        match read_time(text, rules) {
            Ok(ms) => Ok(Self::Time {
                ms,
                text: text.to_owned(),
            }),
            Err(TimeProblem::Unrecognised) => Err(UsageError(format!(
                "{flag}: {text:?} is neither a revision number nor a time ({TIME_FORMS})"
            ))),
            Err(p) => Err(p.usage(flag, text)),
        }
    }

    fn time(flag: &str, text: &str, rules: &TimeRules) -> Result<Self, UsageError> {
        Ok(Self::Time {
            ms: parse_time(flag, text, rules)?,
            text: text.to_owned(),
        })
    }
}

/// The forms every time flag takes, for messages.
const TIME_FORMS: &str =
    "an RFC 3339 time like 2026-11-25T14:07:00Z or 2026-11-25T15:07:00+01:00, now, or now-DURATION like now-10m or now-1h30m";

/// Why a text is not a time.
#[derive(Debug, PartialEq, Eq)]
enum TimeProblem {
    /// A date and time without a zone, and no `--utc`.
    NoZone,
    /// `now` followed by something other than `-DURATION`.
    BadRelative(String),
    /// Nothing like a time.
    Unrecognised,
}

impl TimeProblem {
    fn usage(self, flag: &str, text: &str) -> UsageError {
        let t = text.trim();
        UsageError(match self {
            Self::NoZone => format!(
                "{flag}: {text:?} has no time zone, and the restorer never guesses one: write {t}Z for UTC or an offset like {t}+01:00, or pass --utc to read times without a zone as UTC"
            ),
            Self::BadRelative(why) => format!(
                "{flag}: {text:?}: {why}; relative times are now or now-DURATION, like now-10m or now-1h30m"
            ),
            Self::Unrecognised => format!(
                "{flag}: {text:?} is not a time: give {TIME_FORMS} (with --utc, also a time without a zone like 2026-11-25T14:07:00)"
            ),
        })
    }
}

/// Parses a time flag into Unix milliseconds. The one parser of every
/// flag that takes a time:
/// - RFC 3339 with `Z` or an offset: `2026-11-25T14:07:00Z`,
///   `2026-11-25T15:07:00.250+01:00`;
/// - `now`, and `now-DURATION` (a humantime duration: `now-10m`,
///   `now-1h30m`, `now-90s`), from [`TimeRules::now_ms`];
/// - a date and time without a zone (`2026-11-25T14:06:30`, fractional
///   seconds allowed) only with `--utc`, as UTC: never a guessed zone.
///
/// # Errors
/// [`UsageError`] naming `flag`, with the forms accepted (and `--utc` for a
/// time without a zone).
pub fn parse_time(flag: &str, text: &str, rules: &TimeRules) -> Result<i64, UsageError> {
    read_time(text, rules).map_err(|p| p.usage(flag, text))
}

fn read_time(text: &str, rules: &TimeRules) -> Result<i64, TimeProblem> {
    let t = text.trim();
    if let Some(rest) = t.strip_prefix("now") {
        let rest = rest.trim_start();
        if rest.is_empty() {
            return Ok(rules.now_ms);
        }
        let Some(ago) = rest.strip_prefix('-') else {
            return Err(TimeProblem::BadRelative(if rest.starts_with('+') {
                "a time after now is not archived yet".into()
            } else {
                format!("{rest:?} after now is not -DURATION")
            }));
        };
        let d = humantime::parse_duration(ago.trim()).map_err(|e| {
            TimeProblem::BadRelative(format!(
                "{:?} is not a duration like 10m or 1h30m ({e})",
                ago.trim()
            ))
        })?;
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        return Ok(rules.now_ms.saturating_sub(ms));
    }
    if let Ok(time) = chrono::DateTime::parse_from_rfc3339(t) {
        return Ok(time.timestamp_millis());
    }
    let zoneless = ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(t, f).ok());
    match zoneless {
        Some(time) if rules.utc => Ok(time.and_utc().timestamp_millis()),
        Some(_) => Err(TimeProblem::NoZone),
        None => Err(TimeProblem::Unrecognised),
    }
}

/// How a time flag's text reads in messages: as given, with the moment it
/// means when that is not spelled out (`now-10m (2026-…Z)`).
pub fn label_time(text: &str, ms: i64) -> String {
    if chrono::DateTime::parse_from_rfc3339(text.trim()).is_ok() {
        text.to_owned()
    } else {
        format!("{text} ({})", format_ms(ms))
    }
}

/// A point placed on a revision.
#[derive(Clone, Debug)]
pub struct Placed {
    /// The revision.
    pub revision: Revision,
    /// The generation it must be read from: the one named, or the one a
    /// time was placed in; `None` lets the plan choose.
    pub generation: Option<GenerationId>,
    /// How a time was placed (`None` for a revision).
    pub choice: Option<TimeChoice>,
}

/// Places `point` on a revision, in `generation` if given (a time is placed
/// in the newest generation covering it otherwise, by `rules`).
///
/// # Errors
/// As [`source::resolve_time`]: a time the archive cannot place
/// ([`crate::plan::PlanError`]), store or integrity errors.
pub async fn place(
    archive: &Archive,
    listing: &ArchiveListing,
    point: &Point,
    generation: Option<GenerationId>,
    rules: &TimeRules,
) -> anyhow::Result<Placed> {
    Ok(match point {
        Point::Latest => {
            let newest = crate::plan::ranges(listing)
                .into_iter()
                .filter(|r| generation.is_none_or(|g| r.generation == g))
                .max_by_key(|r| (r.generation, r.last))
                .ok_or(crate::plan::PlanError::Empty)?;
            Placed {
                revision: newest.last,
                generation: Some(newest.generation),
                choice: None,
            }
        }
        Point::Revision(r) => Placed {
            revision: *r,
            generation,
            choice: None,
        },
        Point::Time { ms, text } => {
            let choice =
                source::resolve_time(archive, listing, *ms, text, generation, rules).await?;
            Placed {
                revision: choice.revision,
                generation: Some(choice.generation),
                choice: Some(choice),
            }
        }
    })
}

/// What a time was placed on, for the user: `time T -> revision R
/// (generation G, observed …)`, with a note when the next revision's commit
/// time is uncertain, and why a time after the archive's newest moment
/// took its newest revision.
pub fn describe_time_choice(text: &str, choice: &TimeChoice) -> String {
    let mut s = format!(
        "time {} -> revision {} (generation {}",
        label_time(text, choice.time_ms),
        choice.revision,
        choice.generation
    );
    if let Some(ms) = choice.observed_ms {
        s += &format!(", observed {}", format_ms(ms));
    }
    s.push(')');
    if let Some(after) = choice.uncertain_after_ms {
        s += &format!(
            "; note: revision {} was observed while catching up and may have been committed as early as {}",
            choice.revision + 1,
            format_ms(after)
        );
    }
    if let Some(c) = &choice.newest {
        s += &format!(
            "; the archive's newest revision: the time is after its newest vouched moment {}, and the archive is current (within {}), so the source is taken to be still at revision {}; writes after {} that the archiver has not sealed yet are not included",
            c.describe_vouched(),
            c.describe_bound(),
            choice.revision,
            format_ms(c.vouched_ms)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-25T14:07:00Z.
    const NOW_MS: i64 = 1_795_615_620_000;

    fn rules(utc: bool) -> TimeRules {
        TimeRules {
            now_ms: NOW_MS,
            utc,
            max_staleness_ms: 120_000,
        }
    }

    #[test]
    fn rfc3339_now_and_now_minus_a_duration() {
        let r = rules(false);
        assert_eq!(parse_time("--time", "2026-11-25T14:07:00Z", &r), Ok(NOW_MS));
        assert_eq!(
            parse_time("--time", " 2026-11-25T15:07:00.250+01:00 ", &r),
            Ok(NOW_MS + 250)
        );
        assert_eq!(parse_time("--time", "now", &r), Ok(NOW_MS));
        assert_eq!(parse_time("--time", "now-10m", &r), Ok(NOW_MS - 600_000));
        assert_eq!(
            parse_time("--time", "now - 1h30m", &r),
            Ok(NOW_MS - 5_400_000)
        );
        assert_eq!(parse_time("--time", "now-90s", &r), Ok(NOW_MS - 90_000));
    }

    #[test]
    fn a_time_without_a_zone_needs_utc() {
        for text in [
            "2026-11-25T14:06:30",
            "2026-11-25T14:06:30.5",
            "2026-11-25 14:06:30",
        ] {
            let e = parse_time("--time", text, &rules(false)).unwrap_err();
            assert!(e.0.contains("has no time zone"), "{e}");
            assert!(e.0.contains("--utc"), "{e}");
            assert!(e.0.contains(&format!("{text}Z")), "{e}");
        }
        let r = rules(true);
        assert_eq!(
            parse_time("--time", "2026-11-25T14:06:30", &r),
            Ok(NOW_MS - 30_000)
        );
        assert_eq!(
            parse_time("--time", "2026-11-25T14:06:30.125", &r),
            Ok(NOW_MS - 29_875)
        );
        // --utc never overrides a zone that is given.
        assert_eq!(
            parse_time("--time", "2026-11-25T15:07:00+01:00", &r),
            Ok(NOW_MS)
        );
    }

    #[test]
    fn bad_times_name_the_flag_and_the_forms() {
        let r = rules(true);
        for (text, says) in [
            ("yesterday", "is not a time"),
            ("2026-11-25", "is not a time"),
            ("now+10m", "after now is not archived"),
            ("now-10 parsecs", "is not a duration"),
            ("now-", "is not a duration"),
            ("nowish", "is not -DURATION"),
            ("2026-13-25T14:07:00Z", "is not a time"),
        ] {
            let e = parse_time("--to", text, &r).unwrap_err();
            assert!(e.0.starts_with(&format!("--to: {text:?}")), "{e}");
            assert!(e.0.contains(says), "{text}: {e}");
            assert!(e.0.contains("now-10m"), "{e}");
        }
    }

    #[test]
    fn a_flag_takes_a_revision_or_a_time() {
        let r = rules(false);
        assert_eq!(Point::parse("--from", "42", &r), Ok(Point::Revision(42)));
        assert_eq!(
            Point::parse("--to", "1970-01-01T00:00:01.5Z", &r),
            Ok(Point::Time {
                ms: 1_500,
                text: "1970-01-01T00:00:01.5Z".into()
            })
        );
        assert_eq!(
            Point::parse("--to", "now-1m", &r),
            Ok(Point::Time {
                ms: NOW_MS - 60_000,
                text: "now-1m".into()
            })
        );
        let e = Point::parse("--to", "yesterday", &r).unwrap_err();
        assert!(
            e.0.starts_with("--to: \"yesterday\" is neither a revision number nor a time"),
            "{e}"
        );
        let e = Point::parse("--from", "2026-11-25T14:06:30", &r).unwrap_err();
        assert!(e.0.contains("--utc"), "{e}");
    }

    #[test]
    fn revision_and_time_flags_are_exclusive() {
        let r = rules(false);
        assert_eq!(Point::from_flags(Some(7), None, &r), Ok(Point::Revision(7)));
        assert_eq!(Point::from_flags(None, None, &r), Ok(Point::Latest));
        assert!(Point::from_flags(Some(7), Some("1970-01-01T00:00:00Z"), &r).is_err());
        let e = Point::from_flags(None, Some("noon"), &r).unwrap_err();
        assert!(e.0.starts_with("--time: \"noon\""), "{e}");
    }

    #[test]
    fn an_archive_is_current_while_its_newest_moment_is_recent() {
        let r = rules(false);
        let c = r.currency(NOW_MS - 120_000);
        assert!(c.current);
        assert_eq!(c.age_ms, 120_000);
        assert!(!r.currency(NOW_MS - 120_001).current);
        // The archiver's clock ahead of the restorer's.
        assert!(r.currency(NOW_MS + 5_000).current);
        // Nothing vouched for.
        assert!(!r.currency(0).current);
        assert_eq!(c.describe_bound(), "--max-staleness 2m");
        assert_eq!(
            c.describe_vouched(),
            "2026-11-25T14:05:00.000Z (120.000 s ago)"
        );
    }

    #[test]
    fn a_time_after_the_newest_moment_takes_the_newest_revision_only_when_current() {
        let r = rules(false);
        let vouched = NOW_MS - 30_000;
        assert!(matches!(
            r.after_newest(NOW_MS, vouched),
            AfterNewest::Newest(c) if c.vouched_ms == vouched && c.age_ms == 30_000
        ));
        assert!(matches!(
            r.after_newest(NOW_MS - 10_000, vouched),
            AfterNewest::Newest(_)
        ));
        assert_eq!(r.after_newest(NOW_MS + 1, vouched), AfterNewest::Future);
        assert!(matches!(
            r.after_newest(NOW_MS, NOW_MS - 600_000),
            AfterNewest::Stale(c) if !c.current && c.age_ms == 600_000
        ));
        let wider = TimeRules {
            max_staleness_ms: 900_000,
            ..r
        };
        assert!(matches!(
            wider.after_newest(NOW_MS, NOW_MS - 600_000),
            AfterNewest::Newest(_)
        ));
    }

    #[test]
    fn labels_spell_out_relative_times() {
        assert_eq!(
            label_time("2026-11-25T14:07:00Z", NOW_MS),
            "2026-11-25T14:07:00Z"
        );
        assert_eq!(
            label_time("now-1m", NOW_MS - 60_000),
            "now-1m (2026-11-25T14:06:00.000Z)"
        );
    }
}

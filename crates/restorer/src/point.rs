//! Points in an archive's history as the commands' flags name them: a
//! revision or a moment (`--revision`/`--time` of `restore` and `export`,
//! `--from`/`--to` of `history` and `diff`), parsed in one way and placed on
//! a revision in one way.

use etcdpitr_common::layout::GenerationId;
use etcdpitr_common::listing::ArchiveListing;
use etcdpitr_common::store::Archive;
use etcdpitr_common::Revision;

use crate::source::{self, TimeChoice};
use crate::{format_ms, UsageError};

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
        /// As given (RFC 3339), for messages.
        text: String,
    },
}

impl Point {
    /// The point of `--revision N` or `--time T`; neither is the newest
    /// restorable revision.
    ///
    /// # Errors
    /// [`UsageError`] when both are given, or for a bad time.
    pub fn from_flags(revision: Option<Revision>, time: Option<&str>) -> Result<Self, UsageError> {
        match (revision, time) {
            (Some(r), None) => Ok(Self::Revision(r)),
            (None, Some(t)) => Self::time("--time", t),
            (None, None) => Ok(Self::Latest),
            (Some(_), Some(_)) => Err(UsageError(
                "give at most one of --revision or --time".into(),
            )),
        }
    }

    /// The point of a flag that takes either, like `--from` and `--to`: a
    /// decimal revision number or an RFC 3339 time.
    ///
    /// # Errors
    /// [`UsageError`] naming `flag` when `text` is neither.
    pub fn parse(flag: &str, text: &str) -> Result<Self, UsageError> {
        match text.trim().parse::<Revision>() {
            Ok(r) => Ok(Self::Revision(r)),
            Err(_) => Self::time(flag, text).map_err(|_| {
                UsageError(format!(
                    "{flag}: {text:?} is neither a revision number nor an RFC 3339 time like 2026-11-25T14:07:00Z"
                ))
            }),
        }
    }

    fn time(flag: &str, text: &str) -> Result<Self, UsageError> {
        Ok(Self::Time {
            ms: parse_time(flag, text)?,
            text: text.to_owned(),
        })
    }
}

/// Parses an RFC 3339 time into Unix milliseconds.
///
/// # Errors
/// [`UsageError`] naming `flag`.
pub fn parse_time(flag: &str, s: &str) -> Result<i64, UsageError> {
    let t = chrono::DateTime::parse_from_rfc3339(s.trim()).map_err(|e| {
        UsageError(format!(
            "{flag}: {s:?} is not an RFC 3339 time like 2026-11-25T14:07:00Z ({e})"
        ))
    })?;
    Ok(t.timestamp_millis())
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
/// in the newest generation covering it otherwise).
///
/// # Errors
/// As [`source::resolve_time`]: a time the archive cannot place
/// ([`crate::plan::PlanError`]), store or integrity errors.
pub async fn place(
    archive: &Archive,
    listing: &ArchiveListing,
    point: &Point,
    generation: Option<GenerationId>,
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
            let choice = source::resolve_time(archive, listing, *ms, text, generation).await?;
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
/// time is uncertain.
pub fn describe_time_choice(text: &str, choice: &TimeChoice) -> String {
    let mut s = format!(
        "time {text} -> revision {} (generation {}",
        choice.revision, choice.generation
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
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_takes_a_revision_or_a_time() {
        assert_eq!(Point::parse("--from", "42"), Ok(Point::Revision(42)));
        assert_eq!(
            Point::parse("--to", "1970-01-01T00:00:01.5Z"),
            Ok(Point::Time {
                ms: 1_500,
                text: "1970-01-01T00:00:01.5Z".into()
            })
        );
        let e = Point::parse("--to", "yesterday").unwrap_err();
        assert!(
            e.0.starts_with(
                "--to: \"yesterday\" is neither a revision number nor an RFC 3339 time"
            ),
            "{e}"
        );
    }

    #[test]
    fn revision_and_time_flags_are_exclusive() {
        assert_eq!(Point::from_flags(Some(7), None), Ok(Point::Revision(7)));
        assert_eq!(Point::from_flags(None, None), Ok(Point::Latest));
        assert!(Point::from_flags(Some(7), Some("1970-01-01T00:00:00Z")).is_err());
        let e = Point::from_flags(None, Some("noon")).unwrap_err();
        assert!(e.0.starts_with("--time: \"noon\""), "{e}");
    }
}

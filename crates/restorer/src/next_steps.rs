//! What to do with a restored file: the exact `snapshot restore` commands
//! of the etcd release that will run it (one member, three members), and
//! the `--bump-revision`/`--mark-compacted` advice for clusters whose
//! clients (Kubernetes API servers) saw later revisions.
//!
//! The archive does not record the source's etcd release, but the file
//! does: etcd 3.5 and later keep the raft `term` in the `meta` bucket
//! beside `consistent_index`, etcd 3.4 keeps only `consistent_index`
//! (checked on 3.4.23 and 3.5.1 snapshots). The restored file keeps its
//! base snapshot's `meta` bucket, so it tells which release wrote it.

use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;

use etcdpitr_common::bbolt::{BoltError, BoltReader};
use etcdpitr_common::Revision;

use crate::synth::Bump;

/// An etcd release line, as far as restoring a snapshot differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EtcdRelease {
    /// etcd 3.4: `ETCDCTL_API=3 etcdctl snapshot restore` (no `etcdutl`).
    V34,
    /// etcd 3.5 (and 3.6, which restores the same way): `etcdutl snapshot
    /// restore`.
    V35,
}

impl EtcdRelease {
    /// The command that restores a snapshot file into a data directory.
    pub fn restore_command(self) -> &'static str {
        match self {
            Self::V34 => "ETCDCTL_API=3 etcdctl snapshot restore",
            Self::V35 => "etcdutl snapshot restore",
        }
    }
}

impl std::fmt::Display for EtcdRelease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V34 => "3.4",
            Self::V35 => "3.5",
        })
    }
}

impl FromStr for EtcdRelease {
    type Err = String;

    /// `3.4` or `3.5`, also with a patch version (`3.5.10`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().trim_start_matches('v');
        let minor = t.split('.').take(2).collect::<Vec<_>>().join(".");
        match minor.as_str() {
            "3.4" => Ok(Self::V34),
            "3.5" => Ok(Self::V35),
            _ => Err(format!(
                "{s:?} is not an etcd release this restorer prints commands for: give 3.4 or 3.5 (for 3.6 give 3.5: it restores the same way)"
            )),
        }
    }
}

/// How the release of the printed commands was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseChoice {
    /// `--etcd-version`.
    Flag(EtcdRelease),
    /// Read from the restored file's `meta` bucket.
    File(EtcdRelease),
    /// Neither: 3.5 assumed.
    Assumed,
}

impl ReleaseChoice {
    /// `--etcd-version` if given, else what the file at `path` tells.
    ///
    /// # Errors
    /// The file cannot be read as a bbolt database.
    pub fn choose(flag: Option<EtcdRelease>, path: &Path) -> Result<Self, BoltError> {
        if let Some(r) = flag {
            return Ok(Self::Flag(r));
        }
        Ok(release_of_file(&BoltReader::open(path)?)?.map_or(Self::Assumed, Self::File))
    }

    /// The release chosen.
    pub fn release(self) -> EtcdRelease {
        match self {
            Self::Flag(r) | Self::File(r) => r,
            Self::Assumed => EtcdRelease::V35,
        }
    }

    fn describe(self) -> String {
        match self {
            Self::Flag(r) => format!("etcd {r} (--etcd-version)"),
            Self::File(EtcdRelease::V35) => "etcd 3.5 (the file's meta bucket holds the raft term, which etcd 3.5 and later write; --etcd-version 3.4 to choose otherwise)".into(),
            Self::File(EtcdRelease::V34) => "etcd 3.4 (the file's meta bucket has no raft term: etcd 3.4 wrote it; --etcd-version 3.5 to choose otherwise)".into(),
            Self::Assumed => "etcd 3.5 (assumed: the file does not tell; --etcd-version 3.4 to choose otherwise)".into(),
        }
    }
}

/// The release that wrote an etcd snapshot: `term` (or 3.6's
/// `storageVersion`) in `meta` is 3.5 or later, `consistent_index` alone
/// is 3.4; `None` when the file has neither.
///
/// # Errors
/// An unreadable database.
pub fn release_of_file(db: &BoltReader) -> Result<Option<EtcdRelease>, BoltError> {
    if db.get(b"meta", b"term")?.is_some() || db.get(b"meta", b"storageVersion")?.is_some() {
        return Ok(Some(EtcdRelease::V35));
    }
    Ok(db
        .get(b"meta", b"consistent_index")?
        .map(|_| EtcdRelease::V34))
}

/// Everything the next steps depend on.
#[derive(Clone, Debug)]
pub struct NextSteps<'a> {
    /// The release and how it was chosen.
    pub release: ReleaseChoice,
    /// The restored file (as given; printed absolute).
    pub file: &'a Path,
    /// The revision restored (before any bump).
    pub revision: Revision,
    /// The newest revision the archive holds: clients may have seen it.
    pub newest_archived: Revision,
    /// The bump applied to the file.
    pub bump: Bump,
}

/// A bump comfortably above any revision the old cluster could have
/// reached: etcd's own recovery guide bumps by a billion, which a 64-bit
/// revision affords many times over.
const SUGGESTED_BUMP: i64 = 1_000_000_000;

impl NextSteps<'_> {
    /// The text printed after a restore: commands one per line (indented
    /// two spaces) with `<placeholders>` for what only the operator knows.
    pub fn render(&self) -> String {
        let file = shell_word(
            &std::path::absolute(self.file)
                .unwrap_or_else(|_| self.file.to_owned())
                .display()
                .to_string(),
        );
        let tool = self.release.release().restore_command();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nnext steps for {}:\nstop every kube-apiserver and every etcd member first, and keep the old data directories aside; then",
            self.release.describe()
        );
        let _ = writeln!(
            s,
            "\none member:\n  {tool} {file} --name <member-name> --initial-cluster <member-name>=<peer-url> --initial-advertise-peer-urls <peer-url> --data-dir <new-data-dir>\n  then start etcd with --name <member-name> --data-dir <new-data-dir> and its usual flags"
        );
        let cluster = (1..=3)
            .map(|i| format!("<member-{i}>=<peer-url-{i}>"))
            .collect::<Vec<_>>()
            .join(",");
        let _ = writeln!(
            s,
            "\nthree members (copy {file} to each; the same --initial-cluster and a new --initial-cluster-token for all three, each its own --name and peer URL):"
        );
        for i in 1..=3 {
            let _ = writeln!(
                s,
                "  {tool} {file} --name <member-{i}> --initial-cluster {cluster} --initial-cluster-token <new-cluster-token> --initial-advertise-peer-urls <peer-url-{i}> --data-dir <new-data-dir>"
            );
        }
        let _ = writeln!(
            s,
            "  then start each member with its --name, the restored --data-dir and its usual flags (the members come from the data directory), and check: etcdctl --endpoints <client-url-1>,<client-url-2>,<client-url-3> endpoint status -w table"
        );
        s += &self.kubernetes();
        s
    }

    /// The advice for clients that saw later revisions.
    fn kubernetes(&self) -> String {
        let (r, bump) = (self.revision, self.bump);
        let why = "watch caches and resourceVersions must not go backwards: revisions after the restored one would be reused with other content, and a watch resuming from a resourceVersion it already saw would silently miss the restore's changes";
        if bump.revisions > 0 && bump.mark_compacted {
            return format!(
                "\nKubernetes: this file's revision is {} (--bump-revision {}) and everything at or below it is compacted (--mark-compacted), so API servers and clients that saw revisions up to {} re-list instead of resuming ({why}).\n",
                r + bump.revisions,
                bump.revisions,
                r + bump.revisions
            );
        }
        let seen = (self.newest_archived - r).max(0);
        let suggest = seen.saturating_mul(10).max(SUGGESTED_BUMP);
        if bump.revisions > 0 {
            return format!(
                "\nKubernetes: this file skips {} revisions (--bump-revision) but does not mark them compacted: API servers that keep running, or restart with a watch cache, would resume watches from resourceVersions they saw and keep objects the restore removed. Restore again with --bump-revision {} --mark-compacted so their watches fail as compacted and re-list ({why}).\n",
                bump.revisions, bump.revisions
            );
        }
        format!(
            "\nKubernetes: revision {r} is older than what clients saw (the archive holds revisions up to {}). If API servers keep running against the restored cluster, or anything holds a resourceVersion or a watch cache from the old one, restore again with --bump-revision {suggest} --mark-compacted (any N above the revisions written after {r}: {seen} archived, plus those not yet archived), because {why}; --mark-compacted makes their watches fail as compacted and re-list. Stopping every kube-apiserver during the restore is needed but not enough: controllers, kubelets and other informers resume their watches from the resourceVersions they hold.\n",
            self.newest_archived
        )
    }
}

/// `s` as one shell word: as is when it holds only safe characters, else
/// single-quoted.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:=,@%".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(release: ReleaseChoice, bump: Bump) -> String {
        NextSteps {
            release,
            file: Path::new("/srv/restore/snap.db"),
            revision: 120,
            newest_archived: 150,
            bump,
        }
        .render()
    }

    fn no_bump() -> Bump {
        Bump {
            revisions: 0,
            mark_compacted: false,
            min_lease_ttl_secs: 0,
        }
    }

    #[test]
    fn releases_parse_from_the_flag() {
        assert_eq!("3.4".parse(), Ok(EtcdRelease::V34));
        assert_eq!("3.5.10".parse(), Ok(EtcdRelease::V35));
        assert_eq!("v3.5".parse(), Ok(EtcdRelease::V35));
        let e = "3.6".parse::<EtcdRelease>().unwrap_err();
        assert!(e.contains("give 3.4 or 3.5"), "{e}");
    }

    #[test]
    fn the_commands_name_the_file_and_the_release_tool() {
        let text = steps(ReleaseChoice::File(EtcdRelease::V35), no_bump());
        assert!(
            text.contains("next steps for etcd 3.5 (the file's meta bucket holds the raft term"),
            "{text}"
        );
        assert!(text.contains(
            "\n  etcdutl snapshot restore /srv/restore/snap.db --name <member-name> --initial-cluster <member-name>=<peer-url> --initial-advertise-peer-urls <peer-url> --data-dir <new-data-dir>\n"
        ), "{text}");
        let three: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("  etcdutl snapshot restore") && l.contains("<member-1>"))
            .collect();
        assert_eq!(three.len(), 3, "{text}");
        for (i, line) in three.iter().enumerate() {
            assert!(line.contains("--initial-cluster <member-1>=<peer-url-1>,<member-2>=<peer-url-2>,<member-3>=<peer-url-3> --initial-cluster-token <new-cluster-token>"), "{line}");
            assert!(
                line.contains(&format!("--name <member-{}> ", i + 1)),
                "{line}"
            );
            assert!(
                line.contains(&format!(
                    "--initial-advertise-peer-urls <peer-url-{}> ",
                    i + 1
                )),
                "{line}"
            );
        }
        let text = steps(ReleaseChoice::Flag(EtcdRelease::V34), no_bump());
        assert!(
            text.contains("next steps for etcd 3.4 (--etcd-version)"),
            "{text}"
        );
        assert!(text.contains("\n  ETCDCTL_API=3 etcdctl snapshot restore /srv/restore/snap.db --name <member-name>"), "{text}");
        assert!(!text.contains("etcdutl"), "{text}");
        let text = steps(ReleaseChoice::Assumed, no_bump());
        assert!(text.contains("etcd 3.5 (assumed"), "{text}");
    }

    #[test]
    fn kubernetes_advice_follows_the_bump() {
        let text = steps(ReleaseChoice::Assumed, no_bump());
        assert!(
            text.contains("--bump-revision 1000000000 --mark-compacted"),
            "{text}"
        );
        assert!(text.contains("30 archived"), "{text}");
        assert!(text.contains("must not go backwards"), "{text}");
        let text = steps(
            ReleaseChoice::Assumed,
            Bump {
                revisions: 500,
                ..no_bump()
            },
        );
        assert!(
            text.contains("Restore again with --bump-revision 500 --mark-compacted"),
            "{text}"
        );
        let text = steps(
            ReleaseChoice::Assumed,
            Bump {
                revisions: 500,
                mark_compacted: true,
                min_lease_ttl_secs: 0,
            },
        );
        assert!(
            text.contains("this file's revision is 620 (--bump-revision 500)"),
            "{text}"
        );
        assert!(!text.contains("restore again"), "{text}");
    }

    #[test]
    fn odd_paths_are_quoted() {
        assert_eq!(shell_word("/a/b.db"), "/a/b.db");
        assert_eq!(shell_word("/a b/it's.db"), r"'/a b/it'\''s.db'");
    }

    /// Real snapshots of etcd 3.4.23 and 3.5.1.
    #[test]
    fn the_release_is_read_from_the_meta_bucket() {
        let v35 = include_bytes!("../../common/testdata/etcd-3.5.1-rev31.db");
        let db = BoltReader::from_bytes(v35.to_vec()).unwrap();
        assert_eq!(release_of_file(&db).unwrap(), Some(EtcdRelease::V35));
        let v34 = include_bytes!("../../common/testdata/etcd-3.4.23-rev25-compacted.db");
        let db = BoltReader::from_bytes(v34.to_vec()).unwrap();
        assert_eq!(release_of_file(&db).unwrap(), Some(EtcdRelease::V34));
    }
}

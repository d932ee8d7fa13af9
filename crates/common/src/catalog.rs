//! The local SQLite catalog: what the archiver wrote, and in what state.
//!
//! It is a cache of the store, never the truth: an empty catalog is rebuilt
//! from the store's listing. Rows are written before the action they
//! describe (`spooled` before an upload starts) and updated after it
//! (`uploaded`), so the catalog never claims an object that may not exist.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use thiserror::Error;

use crate::layout::{GenerationId, SegmentName};
use crate::listing::GenerationListing;
use crate::manifest::GenerationManifest;
use crate::Revision;

const SCHEMA_VERSION: i64 = 1;

/// Errors of the catalog.
#[derive(Debug, Error)]
pub enum CatalogError {
    /// SQLite failed.
    #[error("catalog: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The catalog file cannot be created.
    #[error("create catalog {path}: {source}")]
    Io {
        /// The catalog's path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The catalog was written by a newer build.
    #[error("catalog schema version {0} is not supported (this build uses {SCHEMA_VERSION}); move the data directory aside to rebuild it from the store")]
    UnsupportedVersion(i64),
}

/// State of an object the archiver writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectState {
    /// Sealed and durable in the local spool; not yet in the store.
    Spooled,
    /// Durable in the store.
    Uploaded,
}

impl ObjectState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Spooled => "spooled",
            Self::Uploaded => "uploaded",
        }
    }
}

/// The catalog database.
pub struct Catalog {
    conn: Connection,
}

impl Catalog {
    /// Opens (creating if needed) the catalog at `path`.
    ///
    /// # Errors
    /// SQLite errors, or a schema from a newer build.
    pub fn open(path: &Path) -> Result<Self, CatalogError> {
        // SQLite creates a database 0644 and gives its -wal and -shm files
        // the database's mode: create it owner-only first.
        std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new().write(true).create(true),
            crate::store::PRIVATE_FILE_MODE,
        )
        .open(path)
        .map_err(|e| CatalogError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        match version {
            0 => {
                conn.execute_batch(
                    "CREATE TABLE generations (
                        id INTEGER PRIMARY KEY,
                        manifest TEXT NOT NULL);
                     CREATE TABLE segments (
                        generation INTEGER NOT NULL,
                        first INTEGER NOT NULL,
                        last INTEGER NOT NULL,
                        end_ms INTEGER NOT NULL,
                        bytes INTEGER NOT NULL,
                        state TEXT NOT NULL,
                        PRIMARY KEY (generation, first, last, end_ms));
                     CREATE TABLE snapshots (
                        generation INTEGER NOT NULL,
                        revision INTEGER NOT NULL,
                        bytes INTEGER NOT NULL,
                        taken_ms INTEGER NOT NULL,
                        PRIMARY KEY (generation, revision));
                     PRAGMA user_version = 1;",
                )?;
            }
            SCHEMA_VERSION => {}
            other => return Err(CatalogError::UnsupportedVersion(other)),
        }
        Ok(Self { conn })
    }

    /// Records a generation manifest.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn put_generation(&self, manifest: &GenerationManifest) -> Result<(), CatalogError> {
        let json = serde_json::to_string(manifest).expect("manifest serializes");
        self.conn.execute(
            "INSERT OR REPLACE INTO generations (id, manifest) VALUES (?1, ?2)",
            params![manifest.generation.0 as i64, json],
        )?;
        Ok(())
    }

    /// Records a segment in `state` (insert or update).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn put_segment(
        &self,
        generation: GenerationId,
        name: &SegmentName,
        bytes: u64,
        state: ObjectState,
    ) -> Result<(), CatalogError> {
        self.conn.execute(
            "INSERT INTO segments (generation, first, last, end_ms, bytes, state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (generation, first, last, end_ms) DO UPDATE SET state = excluded.state",
            params![
                generation.0 as i64,
                name.first,
                name.last,
                name.end_ms,
                bytes as i64,
                state.as_str()
            ],
        )?;
        Ok(())
    }

    /// Records an uploaded snapshot.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn put_snapshot(
        &self,
        generation: GenerationId,
        revision: Revision,
        bytes: u64,
        taken_ms: i64,
    ) -> Result<(), CatalogError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO snapshots (generation, revision, bytes, taken_ms)
             VALUES (?1, ?2, ?3, ?4)",
            params![generation.0 as i64, revision, bytes as i64, taken_ms],
        )?;
        Ok(())
    }

    /// The newest uploaded segment of a generation.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn last_uploaded_segment(
        &self,
        generation: GenerationId,
    ) -> Result<Option<SegmentName>, CatalogError> {
        Ok(self
            .conn
            .query_row(
                "SELECT first, last, end_ms FROM segments
                 WHERE generation = ?1 AND state = 'uploaded'
                 ORDER BY first DESC, last DESC, end_ms DESC LIMIT 1",
                params![generation.0 as i64],
                |r| {
                    Ok(SegmentName {
                        first: r.get(0)?,
                        last: r.get(1)?,
                        end_ms: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    /// Brings the catalog in line with a generation's listing from the store
    /// (the store wins).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn sync_generation(&mut self, listing: &GenerationListing) -> Result<(), CatalogError> {
        let generation = listing.generation();
        let tx = self.conn.transaction()?;
        if let Some(m) = &listing.manifest {
            let json = serde_json::to_string(m).expect("manifest serializes");
            tx.execute(
                "INSERT OR REPLACE INTO generations (id, manifest) VALUES (?1, ?2)",
                params![generation.0 as i64, json],
            )?;
        }
        for s in &listing.segments {
            tx.execute(
                "INSERT INTO segments (generation, first, last, end_ms, bytes, state)
                 VALUES (?1, ?2, ?3, ?4, 0, 'uploaded')
                 ON CONFLICT (generation, first, last, end_ms) DO UPDATE SET state = 'uploaded'",
                params![generation.0 as i64, s.first, s.last, s.end_ms],
            )?;
        }
        for rev in &listing.snapshots {
            tx.execute(
                "INSERT OR IGNORE INTO snapshots (generation, revision, bytes, taken_ms)
                 VALUES (?1, ?2, 0, 0)",
                params![generation.0 as i64, rev],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::StartReason;

    #[test]
    fn records_and_recovers_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let m = GenerationManifest {
            generation: GenerationId(3),
            cluster_id: 9,
            start_revision: 10,
            started_ms: 1,
            reason: StartReason::NewArchive,
            previous: None,
            detail: String::new(),
            term: 0,
            previous_digest: None,
        };
        {
            let c = Catalog::open(&path).unwrap();
            c.put_generation(&m).unwrap();
            let a = SegmentName {
                first: 11,
                last: 20,
                end_ms: 5,
            };
            let b = SegmentName {
                first: 21,
                last: 30,
                end_ms: 6,
            };
            c.put_segment(GenerationId(3), &a, 10, ObjectState::Spooled)
                .unwrap();
            c.put_segment(GenerationId(3), &a, 10, ObjectState::Uploaded)
                .unwrap();
            c.put_segment(GenerationId(3), &b, 10, ObjectState::Spooled)
                .unwrap();
            c.put_snapshot(GenerationId(3), 10, 100, 1).unwrap();
        }
        let c = Catalog::open(&path).unwrap();
        let stored: String = c
            .conn
            .query_row("SELECT manifest FROM generations WHERE id = 3", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(
            serde_json::from_str::<GenerationManifest>(&stored).unwrap(),
            m
        );
        assert_eq!(
            c.last_uploaded_segment(GenerationId(3))
                .unwrap()
                .unwrap()
                .last,
            20
        );
        let snapshots: i64 = c
            .conn
            .query_row(
                "SELECT revision FROM snapshots WHERE generation = 3",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(snapshots, 10);
    }

    #[test]
    fn catalog_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let c = Catalog::open(&path).unwrap();
        c.put_snapshot(GenerationId(1), 5, 1, 1).unwrap();
        let mut seen = 0;
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let entry = entry.unwrap();
            let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", entry.path().display());
            seen += 1;
        }
        assert_eq!(seen, 3, "catalog.db, -wal and -shm");
    }
}

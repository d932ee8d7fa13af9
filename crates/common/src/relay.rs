//! Two threads on one stream of bytes: this one produces chunks (reads,
//! decompresses, hashes one way), a second one consumes them (hashes
//! another way, writes), so that a long pass over gigabytes uses both
//! cores. Buffers go back and forth, so memory stays at [`BUFFERS`] chunks.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

/// Chunks in flight between the two threads.
pub const BUFFERS: usize = 4;
/// A good chunk size for passes over files: large enough that the
/// hand-over costs nothing, small enough to stay in the CPU's caches.
pub const CHUNK_BYTES: usize = 1 << 20;

/// The producer's end: empty buffers to fill, full ones to hand over.
pub struct Feed {
    full: SyncSender<Vec<u8>>,
    empty: Receiver<Vec<u8>>,
}

impl Feed {
    /// A buffer to fill (with the capacity [`relay`] was given), as its
    /// last use left it: empty at first, then as long as when it was last
    /// sent, so that resizing it to the same length costs nothing (a pass
    /// over gigabytes would otherwise zero every chunk before filling it).
    /// `None` once the consumer stopped (it failed: [`relay`] returns its
    /// error).
    pub fn buffer(&mut self) -> Option<Vec<u8>> {
        self.empty.recv().ok()
    }

    /// Hands a filled buffer to the consumer; false once it stopped.
    pub fn send(&mut self, buf: Vec<u8>) -> bool {
        self.full.send(buf).is_ok()
    }
}

/// Runs `produce` on this thread while `consume` takes, in order, each
/// buffer it sends, on a second thread. Returns what `produce` returned,
/// unless `consume` failed: its error is then the cause (the producer only
/// saw the feed close).
///
/// # Errors
/// The first error of `consume`, else that of `produce`.
///
/// # Panics
/// If either side panics.
pub fn relay<T, E: Send>(
    buffer_len: usize,
    produce: impl FnOnce(&mut Feed) -> Result<T, E>,
    mut consume: impl FnMut(&[u8]) -> Result<(), E> + Send,
) -> Result<T, E> {
    std::thread::scope(|scope| {
        let (full, full_rx) = sync_channel::<Vec<u8>>(BUFFERS);
        let (empty_tx, empty) = sync_channel::<Vec<u8>>(BUFFERS);
        for _ in 0..BUFFERS {
            empty_tx
                .send(Vec::with_capacity(buffer_len))
                .expect("the receiver is here");
        }
        let consumer = scope.spawn(move || -> Result<(), E> {
            for buf in full_rx {
                consume(&buf)?;
                // The producer may be done and gone.
                let _ = empty_tx.send(buf);
            }
            Ok(())
        });
        let mut feed = Feed { full, empty };
        let produced = produce(&mut feed);
        drop(feed);
        let consumed = consumer.join().expect("the consumer panicked");
        consumed?;
        produced
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_arrive_in_order_and_errors_name_their_cause() {
        let mut seen = Vec::new();
        let n = relay(
            8,
            |feed| -> Result<usize, String> {
                for i in 0..100u8 {
                    let mut buf = feed.buffer().ok_or("consumer stopped")?;
                    buf.clear();
                    buf.extend_from_slice(&[i; 8]);
                    assert!(feed.send(buf));
                }
                Ok(100)
            },
            |chunk| {
                seen.extend_from_slice(chunk);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(n, 100);
        assert_eq!(seen.len(), 800);
        assert!(seen.chunks(8).enumerate().all(|(i, c)| c == [i as u8; 8]));

        // The consumer fails at the third chunk: its error, not the
        // producer's view of a closed feed, is returned.
        let err = relay(
            8,
            |feed| -> Result<(), String> {
                loop {
                    let buf = feed.buffer().ok_or("consumer stopped")?;
                    if !feed.send(buf) {
                        return Err("consumer stopped".into());
                    }
                }
            },
            {
                let mut count = 0;
                move |_| {
                    count += 1;
                    if count == 3 {
                        Err("disk full".to_owned())
                    } else {
                        Ok(())
                    }
                }
            },
        )
        .unwrap_err();
        assert_eq!(err, "disk full");
        // Buffers come back as they were sent, so refilling one to the
        // same length costs no zeroing.
        let lens = relay(
            8,
            |feed| -> Result<Vec<usize>, String> {
                let mut lens = Vec::new();
                for _ in 0..=BUFFERS {
                    let mut buf = feed.buffer().ok_or("consumer stopped")?;
                    lens.push(buf.len());
                    buf.resize(3, 7);
                    assert!(feed.send(buf));
                }
                Ok(lens)
            },
            |chunk| {
                if chunk == [7; 3] {
                    Ok(())
                } else {
                    Err(format!("{chunk:?}"))
                }
            },
        )
        .unwrap();
        assert_eq!(lens, [vec![0; BUFFERS], vec![3]].concat());
        // A producer's own error comes back when the consumer is fine.
        let err = relay(8, |_| Err::<(), _>("bad input".to_owned()), |_| Ok(())).unwrap_err();
        assert_eq!(err, "bad input");
    }
}

//! The plumbing of the staged executor: stages on their own threads, connected by bounded
//! channels, each passing batches downstream in input order.
//!
//! A shard flows `reader -> decode + augment -> captioner -> teachers -> writer`. Every stage
//! works on one batch while its neighbours work on the batches before and after it, so
//! decoding and writing overlap model compute (on a GPU the model stages never wait for the
//! CPU once the queue is full), and since every channel holds at most [`QUEUE_BATCHES`]
//! batches, the memory in flight is bounded by the batch size, never by the shard size.
//!
//! A message is `Ok(Some(batch))`, `Ok(None)` (the input ended: the shard is complete) or
//! `Err` (a stage failed; later stages forward it untouched). A channel that closes without
//! either means the run was stopped (signal, lost claim): the writer must not publish.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::Instant;

use anyhow::Result;

use crate::liveness::Liveness;

/// Batches a channel between two stages holds. One is enough for overlap (a stage hands its
/// result over and starts the next batch while its neighbour works); more only adds memory.
pub const QUEUE_BATCHES: usize = 1;

/// What travels between stages.
pub type Message<T> = Result<Option<T>>;

/// A bounded channel between two stages.
pub fn channel<T>() -> (SyncSender<Message<T>>, Receiver<Message<T>>) {
    std::sync::mpsc::sync_channel(QUEUE_BATCHES)
}

/// Runs one middle stage until its input ends, fails or disconnects: turns every batch into
/// the next stage's batch with `work` and forwards it (or the error `work` returned, after
/// which the stage stops), reporting each batch to `liveness`. Returns the seconds spent
/// inside `work`.
pub fn run_stage<A, B>(
    input: Receiver<Message<A>>,
    output: SyncSender<Message<B>>,
    liveness: &Liveness,
    mut work: impl FnMut(A) -> Result<B>,
) -> f64 {
    let mut busy = 0.0;
    while let Ok(message) = input.recv() {
        let message = match message {
            Ok(Some(batch)) => {
                let started = Instant::now();
                let result = work(batch);
                busy += started.elapsed().as_secs_f64();
                liveness.beat();
                result.map(Some)
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        let last = !matches!(message, Ok(Some(_)));
        // A closed output means the writer stopped early: nothing more is wanted.
        if output.send(message).is_err() || last {
            break;
        }
    }
    busy
}

/// Seconds each stage of a shard spent working (not waiting for its neighbours), by stage
/// name, as recorded in the done record and summed by `dfndr status`.
#[derive(Debug, Default, Clone)]
pub struct StageBusy(pub BTreeMap<String, f64>);

impl StageBusy {
    /// Adds `seconds` to `stage`.
    pub fn add(&mut self, stage: &str, seconds: f64) {
        *self.0.entry(stage.to_string()).or_default() += seconds;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_keep_order_forward_the_end_and_stop_after_an_error() {
        let live = Liveness::new(std::time::Duration::from_secs(60));
        let live = &live;
        let (tx, rx) = channel::<u32>();
        let (tx2, rx2) = channel::<u32>();
        std::thread::scope(|s| {
            s.spawn(move || {
                for i in 0..5 {
                    tx.send(Ok(Some(i))).ok();
                }
                tx.send(Ok(None)).ok();
            });
            s.spawn(move || run_stage(rx, tx2, live, |x| Ok(x * 10)));
            let got: Vec<Option<u32>> = rx2.iter().map(|m| m.ok().flatten()).collect();
            assert_eq!(
                got,
                vec![Some(0), Some(10), Some(20), Some(30), Some(40), None]
            );
        });

        let (tx, rx) = channel::<u32>();
        let (tx2, rx2) = channel::<u32>();
        std::thread::scope(|s| {
            s.spawn(move || {
                for i in 0..5 {
                    if tx.send(Ok(Some(i))).is_err() {
                        return;
                    }
                }
                tx.send(Ok(None)).ok();
            });
            s.spawn(move || {
                run_stage(rx, tx2, live, |x| {
                    if x == 2 {
                        anyhow::bail!("bad batch {x}")
                    }
                    Ok(x)
                })
            });
            let got: Vec<String> = rx2
                .iter()
                .map(|m| match m {
                    Ok(Some(x)) => x.to_string(),
                    Ok(None) => "end".into(),
                    Err(e) => e.to_string(),
                })
                .collect();
            assert_eq!(got, vec!["0", "1", "bad batch 2"]);
        });
    }

    #[test]
    fn a_stopped_writer_unblocks_every_stage() {
        let live = Liveness::new(std::time::Duration::from_secs(60));
        let live = &live;
        let (tx, rx) = channel::<u32>();
        let (tx2, rx2) = channel::<u32>();
        std::thread::scope(|s| {
            let reader = s.spawn(move || {
                let mut sent = 0;
                while tx.send(Ok(Some(sent))).is_ok() {
                    sent += 1;
                }
                sent
            });
            s.spawn(move || run_stage(rx, tx2, live, Ok));
            // The writer takes two batches and stops: the reader must not block forever.
            assert!(matches!(rx2.recv(), Ok(Ok(Some(0)))));
            assert!(matches!(rx2.recv(), Ok(Ok(Some(1)))));
            drop(rx2);
            let sent = reader.join().unwrap_or(u32::MAX);
            assert!(sent < 10, "the reader kept going: {sent}");
        });
    }
}

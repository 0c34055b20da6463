//! The original encoded image of each row of a DFNDR shard, for commands that go back to the
//! pixels (`dfndr embed`, `dfndr caption`, `dfndr export-wds`, the trainer).
//!
//! A row carries its image in the `image` column when the job embedded images; otherwise the
//! image is in the input shard named by the row's `source`, under the row's key. Rows are
//! stored in input order, so the source tar is streamed once, in order, alongside the rows:
//! no random access, no index, and memory for one sample at a time.

use std::io::Read;

use crate::format::Row;
use crate::spool::{Spool, SpooledInput};
use crate::store::StoreError;
use crate::wds::{ReaderLimits, WdsEvent, WdsReader};

/// Why a row's original image could not be found (the row is skipped and counted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// The key is not in the source shard (or not after the previous row's key).
    NotInSource,
    /// The source shard could be read only up to an error before the key.
    SourceUnreadable(String),
}

impl Missing {
    /// The skip reason it is counted under.
    pub fn reason(&self) -> &'static str {
        match self {
            Missing::NotInSource => "missing_original",
            Missing::SourceUnreadable(_) => "unreadable_original",
        }
    }
}

/// The source shard being streamed.
struct Open {
    uri: String,
    events: WdsReader<Box<dyn Read + Send>>,
    /// Why the stream ended early, once it has.
    broken: Option<String>,
    /// Keeps the spooled copy until the cursor moves on.
    _file: SpooledInput,
}

/// Streams the source shards of a DFNDR shard's rows, in row order.
pub struct OriginalsCursor<'a> {
    spool: &'a Spool,
    limits: ReaderLimits,
    open: Option<Open>,
}

impl<'a> OriginalsCursor<'a> {
    /// A cursor that fetches source shards through `spool`.
    pub fn new(spool: &'a Spool, limits: ReaderLimits) -> Self {
        OriginalsCursor {
            spool,
            limits,
            open: None,
        }
    }

    /// The original encoded image of `row`: its `image` column, else the sample with its key
    /// in its source shard (searched forward from the previous row's). A source shard that
    /// cannot be opened at all is an error (retrying the shard may help); a key that is not
    /// found is a [`Missing`] for the caller to count.
    pub fn original(&mut self, row: &Row) -> Result<Result<Vec<u8>, Missing>, StoreError> {
        if let Some(image) = &row.image {
            return Ok(Ok(image.clone()));
        }
        if self.open.as_ref().is_none_or(|o| o.uri != row.source) {
            let file = self.spool.take(&row.source)?;
            let events = WdsReader::new(file.open()?, self.limits);
            self.open = Some(Open {
                uri: row.source.clone(),
                events,
                broken: None,
                _file: file,
            });
        }
        let Some(open) = self.open.as_mut() else {
            return Ok(Err(Missing::NotInSource));
        };
        if let Some(why) = &open.broken {
            return Ok(Err(Missing::SourceUnreadable(why.clone())));
        }
        loop {
            match open.events.next() {
                None => return Ok(Err(Missing::NotInSource)),
                Some(Ok(WdsEvent::Sample(s))) if s.key == row.key => return Ok(Ok(s.image)),
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let why = format!("{}: {e}", open.uri);
                    open.broken = Some(why.clone());
                    return Ok(Err(Missing::SourceUnreadable(why)));
                }
            }
        }
    }
}

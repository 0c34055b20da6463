//! [`ShardReader`]: opens a DFNDR v1 file, refusing anything else before decoding data, and
//! streams its rows batch by batch.

use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, Float32Type, Int32Type, UInt32Type, UInt8Type};
use arrow_array::{
    Array, BinaryArray, BooleanArray, DictionaryArray, FixedSizeListArray, Float16Array,
    Float32Array, Int32Array, ListArray, PrimitiveArray, RecordBatch, StringArray, StructArray,
    UInt32Array, UInt8Array,
};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use parquet::arrow::ProjectionMask;
use parquet::file::metadata::ParquetMetaDataReader;
use parquet::file::reader::ChunkReader;

use super::meta::FileMeta;
use super::physical::{check_codecs, check_pages, check_row_groups};
use super::row::{AugOp, Paug, Row, SynCaptions};
use super::schema::{col, EmbDtype, Layout};
use super::values::ValueLimits;
use super::{FormatError, SCHEMA_VERSION};

/// Rows decoded per arrow batch unless [`ShardReader::with_batch_rows`] says otherwise.
const DEFAULT_BATCH_ROWS: usize = 1024;

/// An opened DFNDR v1 file: metadata and layout are available at once, rows on demand.
pub struct ShardReader<R: ChunkReader + 'static> {
    builder: ParquetRecordBatchReaderBuilder<R>,
    meta: FileMeta,
    layout: Layout,
    read_layout: Layout,
    projection: Option<Vec<usize>>,
    num_rows: u64,
    batch_rows: usize,
}

impl ShardReader<File> {
    /// Opens the file at `path`.
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self, FormatError> {
        Self::open(File::open(path)?)
    }
}

impl<R: ChunkReader + 'static> ShardReader<R> {
    /// Opens a DFNDR file from any parquet [`ChunkReader`] (a `File`, or `bytes::Bytes`).
    ///
    /// Reads only the footer. Checks, in this order: that it is parquet
    /// ([`FormatError::NotParquet`]); that `dfndr.schema_version` exists
    /// ([`FormatError::NotDfndr`]) and equals [`SCHEMA_VERSION`]
    /// ([`FormatError::UnsupportedSchemaVersion`]); that every column chunk uses a codec this
    /// build decodes; that the row groups' row counts add up and every column chunk and page
    /// lies inside the file and claims no more decompressed bytes than its data can hold; the
    /// rest of the metadata; the schema ([`Layout::from_arrow_schema`]); that the metadata
    /// matches the schema ([`FileMeta::validate`]).
    ///
    /// Every row is then checked as it is decoded: its shape against the layout
    /// ([`Row::check`]) and its values against their valid ranges ([`Row::validate_values`],
    /// with the view count and augmentation size the metadata records).
    pub fn open(reader: R) -> Result<Self, FormatError> {
        let metadata = guard("reading the parquet footer", || {
            ParquetMetaDataReader::new()
                .parse_and_finish(&reader)
                .map_err(FormatError::NotParquet)
        })?;
        let kv = metadata.file_metadata().key_value_metadata();
        // Version first: a future version may change anything else, including the metadata.
        let found = FileMeta::schema_version_of(kv)?;
        if found != SCHEMA_VERSION {
            return Err(FormatError::UnsupportedSchemaVersion {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        // Before anything is decoded: a codec this build lacks would otherwise fail mid-stream
        // with a terse "disabled feature" error.
        check_codecs(&metadata)?;
        // Row counts, chunk ranges and page sizes are stored numbers the decoder sums, slices
        // and allocates by; see physical.rs.
        check_row_groups(&metadata, reader.len())?;
        check_pages(&metadata, &reader)
            .map_err(|e| FormatError::Corrupt(format!("checking the page headers: {e}")))?;
        let meta = FileMeta::from_key_values(kv)?;
        let num_rows = u64::try_from(metadata.file_metadata().num_rows()).map_err(|_| {
            FormatError::NotParquet(parquet::errors::ParquetError::General(format!(
                "negative row count {}",
                metadata.file_metadata().num_rows()
            )))
        })?;
        let arrow_meta = guard("reading the arrow schema", || {
            Ok(ArrowReaderMetadata::try_new(
                Arc::new(metadata),
                ArrowReaderOptions::new(),
            )?)
        })?;
        let layout = Layout::from_arrow_schema(arrow_meta.schema())?;
        // The writer's check, so that a file whose teachers do not add up to D is refused
        // before any row is decoded.
        meta.validate(&layout)?;
        Ok(ShardReader {
            builder: ParquetRecordBatchReaderBuilder::new_with_metadata(reader, arrow_meta),
            meta,
            read_layout: layout.clone(),
            layout,
            projection: None,
            num_rows,
            batch_rows: DEFAULT_BATCH_ROWS,
        })
    }

    /// The file's DFNDR metadata.
    pub fn meta(&self) -> &FileMeta {
        &self.meta
    }

    /// The file's layout (all its columns, whatever [`Self::select`] chose).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The layout rows will be decoded with: the file's, narrowed by [`Self::select`].
    pub fn read_layout(&self) -> &Layout {
        &self.read_layout
    }

    /// Number of rows in the file (from the footer, without reading data).
    pub fn num_rows(&self) -> u64 {
        self.num_rows
    }

    /// Number of parquet row groups.
    pub fn num_row_groups(&self) -> usize {
        self.builder.metadata().num_row_groups()
    }

    /// Sets how many rows are decoded at a time (the reader's memory bound); at least 1.
    pub fn with_batch_rows(mut self, rows: usize) -> Self {
        self.batch_rows = rows.max(1);
        self
    }

    /// Reads only the named optional columns besides the always-read required ones (key,
    /// source, url, caption, width, height), e.g. skip `image` and `syn_text_*` for training on
    /// embeddings. Selecting `syn_text_TAG_emb` implies `syn_text_TAG`. Fields of unselected
    /// columns come back empty, as if the file lacked them.
    pub fn select(mut self, columns: &[&str]) -> Result<Self, FormatError> {
        let all = self.layout.column_names();
        if let Some(unknown) = columns.iter().find(|c| !all.iter().any(|a| a == *c)) {
            return Err(FormatError::Schema {
                column: unknown.to_string(),
                reason: format!(
                    "cannot be selected, the file's columns are {}",
                    all.join(", ")
                ),
            });
        }
        let wanted = |name: &str| columns.contains(&name);
        let file = &self.layout;
        let mut read = Layout {
            embed_images: file.embed_images && wanted(col::IMAGE),
            paug: file.paug && wanted(col::PAUG),
            emb: None,
            image_emb: file.image_emb && wanted(col::IMAGE_EMB),
            text_emb: file.text_emb && wanted(col::TEXT_EMB),
            syn: Vec::new(),
        };
        for syn in &file.syn {
            let emb_name = col::syn_text_emb(&syn.tag);
            let with_emb = syn.with_emb && wanted(&emb_name);
            if with_emb || wanted(&col::syn_text(&syn.tag)) {
                read.syn.push(super::SynLayout {
                    tag: syn.tag.clone(),
                    with_emb,
                });
            }
        }
        if read.has_emb_columns() {
            read.emb = file.emb;
        }
        let names = read.column_names();
        let indices = all
            .iter()
            .enumerate()
            .filter(|(_, a)| names.contains(a))
            .map(|(i, _)| i)
            .collect();
        self.projection = Some(indices);
        self.read_layout = read;
        Ok(self)
    }

    /// Starts decoding; rows come in file order, one arrow batch in memory at a time.
    pub fn rows(self) -> Result<Rows, FormatError> {
        let mut builder = self.builder.with_batch_size(self.batch_rows);
        if let Some(indices) = self.projection {
            let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
            builder = builder.with_projection(mask);
        }
        let mut limits = ValueLimits::from_augmentation(&self.meta.augmentation);
        if !self.read_layout.paug {
            limits.views = None;
        }
        let reader = guard("preparing the row decoder", move || Ok(builder.build()?))?;
        Ok(Rows {
            reader,
            layout: self.read_layout,
            limits,
            batch: None,
            pos: 0,
            index: 0,
            done: false,
        })
    }
}

/// Runs a parquet-library call, turning a panic into [`FormatError::Corrupt`].
///
/// The parquet crate still panics on some corrupt inputs (e.g. a data page that refers to a
/// dictionary page that the damaged footer made it skip), and a bad shard must not take a
/// worker down. Unwind safety: after a panic the caller abandons the decoder, so no broken
/// state is observed.
fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, FormatError>) -> Result<T, FormatError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(FormatError::Corrupt(format!("{what}: {message}")))
    })
}

/// Iterator over the rows of a [`ShardReader`]. Ends after the first error.
pub struct Rows {
    reader: ParquetRecordBatchReader,
    layout: Layout,
    limits: ValueLimits,
    batch: Option<BatchView>,
    pos: usize,
    index: u64,
    done: bool,
}

impl Rows {
    /// The layout rows are decoded with.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}

impl Iterator for Rows {
    type Item = Result<Row, FormatError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            if let Some(view) = &self.batch {
                if self.pos < view.len {
                    let result = view.row(self.pos, self.index, &self.layout, &self.limits);
                    self.pos += 1;
                    self.index += 1;
                    if result.is_err() {
                        self.done = true;
                    }
                    return Some(result);
                }
            }
            self.batch = None;
            let reader = &mut self.reader;
            let next = guard("decoding a row group", || Ok(reader.next()));
            let next = match next {
                Ok(next) => next,
                Err(e) => {
                    // The decoder's state after a panic is unknown; stop here.
                    self.done = true;
                    return Some(Err(e));
                }
            };
            match next {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e.into()));
                }
                Some(Ok(batch)) => match BatchView::new(&batch, &self.layout, self.index) {
                    Ok(view) => {
                        self.batch = Some(view);
                        self.pos = 0;
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                },
            }
        }
    }
}

fn corrupt(index: u64, column: &str, reason: impl std::fmt::Display) -> FormatError {
    FormatError::RowMismatch {
        index,
        key: String::new(),
        reason: format!("column `{column}`: {reason}"),
    }
}

/// Typed, cheaply cloned (reference-counted) handles on one batch's columns.
struct BatchView {
    len: usize,
    key: StringArray,
    source: Source,
    url: StringArray,
    caption: StringArray,
    width: UInt32Array,
    height: UInt32Array,
    image: Option<BinaryArray>,
    paug: Option<PaugView>,
    image_emb: Option<EmbView>,
    text_emb: Option<EmbView>,
    syn: Vec<(TextsView, Option<EmbView>)>,
}

enum Source {
    Dict(DictionaryArray<Int32Type>, StringArray),
    Plain(StringArray),
}

struct PaugView {
    augs: ListArray,
    crop: Int32Array,
    flip: BooleanArray,
    ops: ListArray,
    op: UInt8Array,
    magnitude: Float32Array,
}

struct EmbView {
    name: String,
    list: ListArray,
    dim: usize,
    values: EmbValues,
}

enum EmbValues {
    F16(Float16Array),
    F32(Float32Array),
}

struct TextsView {
    name: String,
    list: ListArray,
    values: StringArray,
}

/// Downcasts or explains; the schema was validated, so failure means a corrupt file.
fn cast<T: Array + Clone + 'static>(
    array: &dyn Array,
    column: &str,
    first_row: u64,
) -> Result<T, FormatError> {
    array.as_any().downcast_ref::<T>().cloned().ok_or_else(|| {
        corrupt(
            first_row,
            column,
            format!("unexpected arrow type {}", array.data_type()),
        )
    })
}

/// Refuses nulls inside nested values, which DFNDR never writes.
fn no_nulls(array: &dyn Array, column: &str, first_row: u64) -> Result<(), FormatError> {
    if array.null_count() > 0 {
        return Err(corrupt(
            first_row,
            column,
            "contains null values inside its lists or structs",
        ));
    }
    Ok(())
}

fn primitive<T: arrow_array::ArrowPrimitiveType>(
    array: &dyn Array,
    column: &str,
    first_row: u64,
) -> Result<PrimitiveArray<T>, FormatError> {
    array.as_primitive_opt::<T>().cloned().ok_or_else(|| {
        corrupt(
            first_row,
            column,
            format!("unexpected arrow type {}", array.data_type()),
        )
    })
}

/// Checks list offsets once per batch so that per-row decoding can index without panicking.
fn checked_list(
    array: &dyn Array,
    column: &str,
    first_row: u64,
    child_len: usize,
) -> Result<ListArray, FormatError> {
    let list: ListArray = cast(array, column, first_row)?;
    let offsets = list.value_offsets();
    let monotonic = offsets.windows(2).all(|w| w[0] <= w[1]);
    let in_range = offsets.first().is_some_and(|f| *f >= 0)
        && offsets
            .last()
            .and_then(|l| usize::try_from(*l).ok())
            .is_some_and(|l| l <= child_len);
    if !monotonic || !in_range {
        return Err(corrupt(first_row, column, "list offsets are out of range"));
    }
    Ok(list)
}

/// Entry range of list row `i`; valid after [`checked_list`].
fn range(list: &ListArray, i: usize) -> Range<usize> {
    let offsets = list.value_offsets();
    let at = |j: usize| {
        offsets
            .get(j)
            .and_then(|o| usize::try_from(*o).ok())
            .unwrap_or(0)
    };
    at(i)..at(i + 1)
}

fn fsl_values(
    array: &dyn Array,
    column: &str,
    first_row: u64,
    size: usize,
) -> Result<Arc<dyn Array>, FormatError> {
    let fsl: FixedSizeListArray = cast(array, column, first_row)?;
    if usize::try_from(fsl.value_length()).ok() != Some(size) {
        return Err(corrupt(
            first_row,
            column,
            format!(
                "fixed-size lists of {} values, expected {size}",
                fsl.value_length()
            ),
        ));
    }
    no_nulls(&fsl, column, first_row)?;
    let values = Arc::clone(fsl.values());
    no_nulls(&values, column, first_row)?;
    if values.len() != fsl.len() * size {
        return Err(corrupt(
            first_row,
            column,
            "fixed-size list values are truncated",
        ));
    }
    Ok(values)
}

impl EmbView {
    fn new(
        batch: &RecordBatch,
        name: &str,
        layout: &Layout,
        first_row: u64,
    ) -> Result<Self, FormatError> {
        let array = column(batch, name, first_row)?;
        let emb = layout
            .emb
            .ok_or_else(|| corrupt(first_row, name, "layout has no embedding dim"))?;
        let DataType::List(_) = array.data_type() else {
            return Err(corrupt(first_row, name, "is not a list"));
        };
        let list: ListArray = cast(array.as_ref(), name, first_row)?;
        let vectors = fsl_values(list.values().as_ref(), name, first_row, emb.dim)?;
        let list = checked_list(array.as_ref(), name, first_row, list.values().len())?;
        let values = match emb.dtype {
            EmbDtype::F16 => EmbValues::F16(primitive::<Float16Type>(&vectors, name, first_row)?),
            EmbDtype::F32 => EmbValues::F32(primitive::<Float32Type>(&vectors, name, first_row)?),
        };
        Ok(EmbView {
            name: name.to_string(),
            list,
            dim: emb.dim,
            values,
        })
    }

    fn get(&self, i: usize, index: u64) -> Result<Vec<Vec<f32>>, FormatError> {
        if self.list.is_null(i) {
            return Err(corrupt(index, &self.name, "is null"));
        }
        let d = self.dim;
        let mut out = Vec::with_capacity(range(&self.list, i).len());
        for j in range(&self.list, i) {
            let span = j * d..(j + 1) * d;
            let vector = match &self.values {
                EmbValues::F16(v) => v
                    .values()
                    .get(span)
                    .map(|s| s.iter().map(|x| x.to_f32()).collect()),
                EmbValues::F32(v) => v.values().get(span).map(<[f32]>::to_vec),
            };
            out.push(vector.ok_or_else(|| corrupt(index, &self.name, "values are truncated"))?);
        }
        Ok(out)
    }
}

fn column(batch: &RecordBatch, name: &str, first_row: u64) -> Result<Arc<dyn Array>, FormatError> {
    batch
        .column_by_name(name)
        .cloned()
        .ok_or_else(|| corrupt(first_row, name, "missing from the decoded batch"))
}

impl BatchView {
    fn new(batch: &RecordBatch, layout: &Layout, first_row: u64) -> Result<Self, FormatError> {
        let get = |name: &str| column(batch, name, first_row);
        let strings = |name: &str| -> Result<StringArray, FormatError> {
            cast(get(name)?.as_ref(), name, first_row)
        };
        let source_array = get(col::SOURCE)?;
        let source = match source_array.data_type() {
            DataType::Utf8 => Source::Plain(cast(source_array.as_ref(), col::SOURCE, first_row)?),
            _ => {
                let dict = source_array
                    .as_dictionary_opt::<Int32Type>()
                    .cloned()
                    .ok_or_else(|| {
                        corrupt(
                            first_row,
                            col::SOURCE,
                            format!("unexpected arrow type {}", source_array.data_type()),
                        )
                    })?;
                let values: StringArray = cast(dict.values().as_ref(), col::SOURCE, first_row)?;
                Source::Dict(dict, values)
            }
        };
        let paug = if layout.paug {
            let name = col::PAUG;
            let array = get(name)?;
            let outer: ListArray = cast(array.as_ref(), name, first_row)?;
            let augs_struct: StructArray = cast(outer.values().as_ref(), name, first_row)?;
            no_nulls(&augs_struct, name, first_row)?;
            let augs = checked_list(array.as_ref(), name, first_row, augs_struct.len())?;
            let field = |f: &str| {
                augs_struct
                    .column_by_name(f)
                    .cloned()
                    .ok_or_else(|| corrupt(first_row, name, format!("struct has no field {f}")))
            };
            let crop_values = fsl_values(field("crop")?.as_ref(), name, first_row, 4)?;
            let crop = primitive::<Int32Type>(&crop_values, name, first_row)?;
            let flip: BooleanArray = cast(field("flip")?.as_ref(), name, first_row)?;
            no_nulls(&flip, name, first_row)?;
            let ops_array = field("ops")?;
            let ops_outer: ListArray = cast(ops_array.as_ref(), name, first_row)?;
            no_nulls(&ops_outer, name, first_row)?;
            let ops_struct: StructArray = cast(ops_outer.values().as_ref(), name, first_row)?;
            no_nulls(&ops_struct, name, first_row)?;
            let ops = checked_list(ops_array.as_ref(), name, first_row, ops_struct.len())?;
            let op_field = |f: &str| {
                ops_struct
                    .column_by_name(f)
                    .cloned()
                    .ok_or_else(|| corrupt(first_row, name, format!("ops struct has no field {f}")))
            };
            let op = primitive::<UInt8Type>(&op_field("op")?, name, first_row)?;
            let magnitude = primitive::<Float32Type>(&op_field("magnitude")?, name, first_row)?;
            no_nulls(&op, name, first_row)?;
            no_nulls(&magnitude, name, first_row)?;
            if flip.len() != augs_struct.len()
                || ops.len() != augs_struct.len()
                || crop.len() != 4 * augs_struct.len()
                || op.len() != ops_struct.len()
                || magnitude.len() != ops_struct.len()
            {
                return Err(corrupt(
                    first_row,
                    name,
                    "struct fields have different lengths",
                ));
            }
            Some(PaugView {
                augs,
                crop,
                flip,
                ops,
                op,
                magnitude,
            })
        } else {
            None
        };
        let emb = |on: bool, name: &str| -> Result<Option<EmbView>, FormatError> {
            on.then(|| EmbView::new(batch, name, layout, first_row))
                .transpose()
        };
        let mut syn = Vec::with_capacity(layout.syn.len());
        for s in &layout.syn {
            let name = col::syn_text(&s.tag);
            let array = get(&name)?;
            let outer: ListArray = cast(array.as_ref(), &name, first_row)?;
            let values: StringArray = cast(outer.values().as_ref(), &name, first_row)?;
            no_nulls(&values, &name, first_row)?;
            let list = checked_list(array.as_ref(), &name, first_row, values.len())?;
            let texts = TextsView {
                name: name.clone(),
                list,
                values,
            };
            syn.push((texts, emb(s.with_emb, &col::syn_text_emb(&s.tag))?));
        }
        Ok(BatchView {
            len: batch.num_rows(),
            key: strings(col::KEY)?,
            source,
            url: strings(col::URL)?,
            caption: strings(col::CAPTION)?,
            width: primitive::<UInt32Type>(&get(col::WIDTH)?, col::WIDTH, first_row)?,
            height: primitive::<UInt32Type>(&get(col::HEIGHT)?, col::HEIGHT, first_row)?,
            image: if layout.embed_images {
                Some(cast(get(col::IMAGE)?.as_ref(), col::IMAGE, first_row)?)
            } else {
                None
            },
            paug,
            image_emb: emb(layout.image_emb, col::IMAGE_EMB)?,
            text_emb: emb(layout.text_emb, col::TEXT_EMB)?,
            syn,
        })
    }

    /// Decodes row `i` of the batch; `index` is its position in the file, for messages.
    fn row(
        &self,
        i: usize,
        index: u64,
        layout: &Layout,
        limits: &ValueLimits,
    ) -> Result<Row, FormatError> {
        let required = |array: &dyn Array, name: &str| -> Result<(), FormatError> {
            if array.is_null(i) {
                Err(corrupt(index, name, "is null"))
            } else {
                Ok(())
            }
        };
        required(&self.key, col::KEY)?;
        let key = self.key.value(i).to_string();
        // From here on, errors name the key too.
        let with_key = |e: FormatError| match e {
            FormatError::RowMismatch { index, reason, .. } => FormatError::RowMismatch {
                index,
                key: key.clone(),
                reason,
            },
            other => other,
        };
        let rest = || -> Result<Row, FormatError> {
            let source = match &self.source {
                Source::Plain(s) => {
                    required(s, col::SOURCE)?;
                    s.value(i).to_string()
                }
                Source::Dict(dict, values) => {
                    required(dict, col::SOURCE)?;
                    let k = dict
                        .keys()
                        .values()
                        .get(i)
                        .and_then(|k| usize::try_from(*k).ok())
                        .filter(|k| *k < values.len())
                        .ok_or_else(|| {
                            corrupt(index, col::SOURCE, "dictionary key out of range")
                        })?;
                    values.value(k).to_string()
                }
            };
            required(&self.caption, col::CAPTION)?;
            required(&self.width, col::WIDTH)?;
            required(&self.height, col::HEIGHT)?;
            let url = (!self.url.is_null(i)).then(|| self.url.value(i).to_string());
            let image = self
                .image
                .as_ref()
                .and_then(|b| (!b.is_null(i)).then(|| b.value(i).to_vec()));
            let paug = match &self.paug {
                Some(p) => p.get(i, index)?,
                None => Vec::new(),
            };
            let embs = |view: &Option<EmbView>| -> Result<Vec<Vec<f32>>, FormatError> {
                view.as_ref().map_or(Ok(Vec::new()), |v| v.get(i, index))
            };
            let mut syn = Vec::with_capacity(self.syn.len());
            for (texts, emb) in &self.syn {
                if texts.list.is_null(i) {
                    return Err(corrupt(index, &texts.name, "is null"));
                }
                let texts = range(&texts.list, i)
                    .map(|j| texts.values.value(j).to_string())
                    .collect();
                syn.push(SynCaptions {
                    texts,
                    emb: embs(emb)?,
                });
            }
            let row = Row {
                key: key.clone(),
                source,
                url,
                caption: self.caption.value(i).to_string(),
                width: self.width.value(i),
                height: self.height.value(i),
                image,
                paug,
                image_emb: embs(&self.image_emb)?,
                text_emb: embs(&self.text_emb)?,
                syn,
            };
            row.check(layout)
                .map_err(|reason| FormatError::RowMismatch {
                    index,
                    key: key.clone(),
                    reason,
                })?;
            row.validate_values(limits)
                .map_err(|problem| FormatError::InvalidValue {
                    index,
                    key: key.clone(),
                    problem,
                })?;
            Ok(row)
        };
        rest().map_err(with_key)
    }
}

impl PaugView {
    fn get(&self, i: usize, index: u64) -> Result<Vec<Paug>, FormatError> {
        if self.augs.is_null(i) {
            return Err(corrupt(index, col::PAUG, "is null"));
        }
        // Lengths and offsets were checked per batch, so indexing below stays in bounds.
        range(&self.augs, i)
            .map(|j| {
                let crop = self
                    .crop
                    .values()
                    .get(4 * j..4 * j + 4)
                    .and_then(|c| <[i32; 4]>::try_from(c).ok())
                    .ok_or_else(|| corrupt(index, col::PAUG, "crop values are truncated"))?;
                let ops = range(&self.ops, j)
                    .map(|m| AugOp {
                        op: self.op.value(m),
                        magnitude: self.magnitude.value(m),
                    })
                    .collect();
                Ok(Paug {
                    crop,
                    flip: self.flip.value(j),
                    ops,
                })
            })
            .collect()
    }
}

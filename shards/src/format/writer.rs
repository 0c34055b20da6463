//! [`ShardWriter`]: rows in, one zstd parquet row group per `row_group_rows` rows out.
//!
//! Rows are appended straight into columnar buffers (no copy of the whole [`Row`] is kept), so
//! memory is bounded by one row group.

use std::io::Write;
use std::sync::Arc;

use arrow_array::builder::{BinaryBuilder, StringBuilder, StringDictionaryBuilder};
use arrow_array::types::Int32Type;
use arrow_array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float16Array, Float32Array, Int32Array, ListArray,
    RecordBatch, StructArray, UInt32Array, UInt8Array,
};
use arrow_buffer::{OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, FieldRef, SchemaRef};
use half::f16;
use parquet::arrow::arrow_writer::ArrowWriterOptions;
use parquet::arrow::{ArrowSchemaConverter, ArrowWriter};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use super::meta::FileMeta;
use super::row::Row;
use super::schema::{self, col, EmbDtype, EmbLayout, Layout};
use super::values::ValueLimits;
use super::FormatError;

/// Above this many bytes of strings and images buffered, a row group is closed early: arrow's
/// utf8/binary arrays use i32 offsets and would overflow at 2 GiB (embedded images can be large).
const MAX_BUFFERED_BYTES: usize = 1 << 30;

/// zstd level: 3 is zstd's own default, a good speed/size balance for float16 embeddings.
const ZSTD_LEVEL: i32 = 3;

/// Writer settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterOptions {
    /// Rows per parquet row group (SPEC: ~1,000). Also the memory bound of the writer.
    pub row_group_rows: usize,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            row_group_rows: 1000,
        }
    }
}

/// Streams [`Row`]s into a DFNDR v1 parquet file.
///
/// Every row is checked against the layout before it is buffered; a refused row leaves the
/// writer usable. An I/O or encoding failure poisons the writer, and the partial output must be
/// discarded (the job protocol writes to a temporary name anyway).
pub struct ShardWriter<W: Write + Send> {
    writer: ArrowWriter<W>,
    schema: SchemaRef,
    layout: Layout,
    limits: ValueLimits,
    columns: Columns,
    row_group_rows: usize,
    rows: u64,
    poisoned: bool,
}

impl<W: Write + Send> ShardWriter<W> {
    /// Starts a file with `layout` and `meta` (stored as key-value metadata).
    pub fn new(
        w: W,
        layout: Layout,
        meta: &FileMeta,
        options: WriterOptions,
    ) -> Result<Self, FormatError> {
        if options.row_group_rows == 0 {
            return Err(FormatError::InvalidOptions(
                "row_group_rows must be at least 1".into(),
            ));
        }
        let base = layout.arrow_schema()?;
        meta.validate(&layout)?;
        let kv = meta.to_key_values(&layout)?;
        // Also in the arrow schema (serialised into ARROW:schema): pyarrow shows that schema's
        // metadata as `schema.metadata` and ignores the parquet key-value entries when it exists.
        let schema_meta: std::collections::HashMap<String, String> = kv
            .iter()
            .filter_map(|e| Some((e.key.clone(), e.value.clone()?)))
            .collect();
        let schema = Arc::new(base.with_metadata(schema_meta));
        let props = writer_properties(&layout, &schema, kv)?;
        let writer = ArrowWriter::try_new_with_options(
            w,
            Arc::clone(&schema),
            ArrowWriterOptions::new().with_properties(props),
        )?;
        let columns = Columns::new(&layout);
        let mut limits = ValueLimits::from_augmentation(&meta.augmentation);
        if !layout.paug {
            limits.views = None;
        }
        Ok(ShardWriter {
            writer,
            schema,
            layout,
            limits,
            columns,
            row_group_rows: options.row_group_rows,
            rows: 0,
            poisoned: false,
        })
    }

    /// The layout rows must match.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Rows accepted so far.
    pub fn rows_written(&self) -> u64 {
        self.rows
    }

    /// Bytes written to the underlying writer so far (closed row groups only).
    pub fn bytes_written(&self) -> usize {
        self.writer.bytes_written()
    }

    /// Appends one row, closing a row group when it is full. Refuses a row that does not match
    /// the layout ([`Row::check`]) or holds a value outside its range ([`Row::validate_values`]),
    /// the same checks the reader makes.
    pub fn write_row(&mut self, row: &Row) -> Result<(), FormatError> {
        if self.poisoned {
            return Err(FormatError::WriterPoisoned);
        }
        let mismatch = |reason: String| FormatError::RowMismatch {
            index: self.rows,
            key: row.key.clone(),
            reason,
        };
        row.check(&self.layout).map_err(mismatch)?;
        row.validate_values(&self.limits)
            .map_err(|problem| FormatError::InvalidValue {
                index: self.rows,
                key: row.key.clone(),
                problem,
            })?;
        let bytes = row_bytes(row);
        if bytes > MAX_BUFFERED_BYTES {
            return Err(mismatch(format!(
                "{bytes} bytes of text and image in one row; at most {MAX_BUFFERED_BYTES} are supported"
            )));
        }
        if self.columns.rows > 0 && self.columns.bytes + bytes > MAX_BUFFERED_BYTES {
            self.flush_row_group()?;
        }
        self.poisoned = true;
        self.columns.push(row)?;
        self.poisoned = false;
        self.rows += 1;
        if self.columns.rows >= self.row_group_rows {
            self.flush_row_group()?;
        }
        Ok(())
    }

    fn flush_row_group(&mut self) -> Result<(), FormatError> {
        if self.columns.rows == 0 {
            return Ok(());
        }
        // Poisoned until the batch is on its way: a half-written row group cannot be retried.
        self.poisoned = true;
        let batch = self.columns.finish(&self.schema)?;
        self.writer.write(&batch)?;
        // One batch per row group keeps row groups at `row_group_rows` rows and memory bounded.
        self.writer.flush()?;
        self.poisoned = false;
        Ok(())
    }

    /// Writes the last row group and the footer; returns the number of rows.
    pub fn finish(self) -> Result<u64, FormatError> {
        self.into_inner().map(|(rows, _)| rows)
    }

    /// Like [`Self::finish`], also giving back the underlying writer (already flushed by parquet,
    /// but not synced: call `File::sync_all` yourself when durability matters).
    pub fn into_inner(mut self) -> Result<(u64, W), FormatError> {
        if self.poisoned {
            return Err(FormatError::WriterPoisoned);
        }
        self.flush_row_group()?;
        let inner = self.writer.into_inner()?;
        Ok((self.rows, inner))
    }
}

/// zstd everywhere; no dictionary or statistics for embedding and image columns, where
/// dictionaries never pay off (near-unique values) and min/max statistics are meaningless.
///
/// Measured (test `measure_size`, 2,000 rows, K=2, N=5, D=1536 random unit vectors): with
/// dictionaries the file is 3.6% (float16) / 4.0% (float32) larger. BYTE_STREAM_SPLIT would save
/// another ~8%, but DuckDB 2.0 cannot read it on float16 (FIXED_LEN_BYTE_ARRAY), so PLAIN it is.
fn writer_properties(
    layout: &Layout,
    schema: &SchemaRef,
    kv: Vec<KeyValue>,
) -> Result<WriterProperties, FormatError> {
    let mut builder = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
        .set_max_row_group_row_count(None)
        .set_key_value_metadata(Some(kv));
    let mut plain_roots: Vec<String> = vec![
        col::IMAGE.into(),
        col::IMAGE_EMB.into(),
        col::TEXT_EMB.into(),
    ];
    plain_roots.extend(
        layout
            .syn
            .iter()
            .filter(|s| s.with_emb)
            .map(|s| col::syn_text_emb(&s.tag)),
    );
    // Leaf paths depend on how parquet nests lists; ask the converter instead of guessing.
    let descr = ArrowSchemaConverter::new().convert(schema)?;
    for column in descr.columns() {
        let path = column.path();
        if path
            .parts()
            .first()
            .is_some_and(|root| plain_roots.contains(root))
        {
            let path = ColumnPath::new(path.parts().to_vec());
            builder = builder
                .set_column_dictionary_enabled(path.clone(), false)
                .set_column_statistics_enabled(path, EnabledStatistics::None);
        }
    }
    Ok(builder.build())
}

/// Bytes of variable-length data a row adds to the string and binary buffers.
fn row_bytes(row: &Row) -> usize {
    row.key.len()
        + row.source.len()
        + row.url.as_ref().map_or(0, String::len)
        + row.caption.len()
        + row.image.as_ref().map_or(0, Vec::len)
        + row
            .syn
            .iter()
            .flat_map(|s| s.texts.iter())
            .map(String::len)
            .sum::<usize>()
}

fn offset(n: usize) -> Result<i32, FormatError> {
    i32::try_from(n)
        .map_err(|_| FormatError::InvalidOptions(format!("{n} list entries in one row group")))
}

fn list_array(
    item: FieldRef,
    offsets: Vec<i32>,
    values: ArrayRef,
) -> Result<ArrayRef, FormatError> {
    Ok(Arc::new(ListArray::try_new(
        item,
        OffsetBuffer::new(ScalarBuffer::from(offsets)),
        values,
        None,
    )?))
}

fn list_item(dt: &DataType) -> Result<FieldRef, FormatError> {
    match dt {
        DataType::List(item) => Ok(Arc::clone(item)),
        other => Err(FormatError::InvalidOptions(format!(
            "internal: expected a list type, got {other}"
        ))),
    }
}

fn fsl_item(dt: &DataType) -> Result<FieldRef, FormatError> {
    match dt {
        DataType::FixedSizeList(item, _) => Ok(Arc::clone(item)),
        other => Err(FormatError::InvalidOptions(format!(
            "internal: expected a fixed_size_list type, got {other}"
        ))),
    }
}

/// Buffered `list<fixed_size_list<float, D>>` column.
struct EmbColumn {
    emb: EmbLayout,
    offsets: Vec<i32>,
    f16: Vec<f16>,
    f32: Vec<f32>,
    vectors: usize,
}

impl EmbColumn {
    fn new(emb: EmbLayout) -> Self {
        EmbColumn {
            emb,
            offsets: vec![0],
            f16: Vec::new(),
            f32: Vec::new(),
            vectors: 0,
        }
    }

    fn push(&mut self, vectors: &[Vec<f32>]) -> Result<(), FormatError> {
        for v in vectors {
            match self.emb.dtype {
                EmbDtype::F16 => self.f16.extend(v.iter().map(|x| f16::from_f32(*x))),
                EmbDtype::F32 => self.f32.extend_from_slice(v),
            }
        }
        self.vectors += vectors.len();
        self.offsets.push(offset(self.vectors)?);
        Ok(())
    }

    fn finish(&mut self) -> Result<ArrayRef, FormatError> {
        let list_type = schema::emb_type(self.emb)?;
        let vector_item = list_item(&list_type)?;
        let float_item = fsl_item(vector_item.data_type())?;
        let values: ArrayRef = match self.emb.dtype {
            EmbDtype::F16 => Arc::new(Float16Array::from(std::mem::take(&mut self.f16))),
            EmbDtype::F32 => Arc::new(Float32Array::from(std::mem::take(&mut self.f32))),
        };
        let dim = i32::try_from(self.emb.dim)
            .map_err(|_| FormatError::InvalidLayout(format!("embedding dim {}", self.emb.dim)))?;
        let vectors = FixedSizeListArray::try_new(float_item, dim, values, None)?;
        let offsets = std::mem::replace(&mut self.offsets, vec![0]);
        self.vectors = 0;
        list_array(vector_item, offsets, Arc::new(vectors))
    }
}

/// Buffered `paug` column, flattened into its leaves.
#[derive(Default)]
struct PaugColumn {
    offsets: Vec<i32>,
    crop: Vec<i32>,
    flip: Vec<bool>,
    ops_offsets: Vec<i32>,
    op: Vec<u8>,
    magnitude: Vec<f32>,
}

impl PaugColumn {
    fn new() -> Self {
        PaugColumn {
            offsets: vec![0],
            ops_offsets: vec![0],
            ..Default::default()
        }
    }

    fn push(&mut self, row: &Row) -> Result<(), FormatError> {
        for p in &row.paug {
            self.crop.extend_from_slice(&p.crop);
            self.flip.push(p.flip);
            for o in &p.ops {
                self.op.push(o.op);
                self.magnitude.push(o.magnitude);
            }
            self.ops_offsets.push(offset(self.op.len())?);
        }
        self.offsets.push(offset(self.flip.len())?);
        Ok(())
    }

    fn finish(&mut self) -> Result<ArrayRef, FormatError> {
        let taken = std::mem::replace(self, PaugColumn::new());
        let paug_type = schema::paug_type();
        let aug_item = list_item(&paug_type)?;
        let paug_fields = schema::paug_fields();
        let crop_item = fsl_item(&schema::crop_type())?;
        let crop = FixedSizeListArray::try_new(
            crop_item,
            4,
            Arc::new(Int32Array::from(taken.crop)),
            None,
        )?;
        let ops_struct = StructArray::try_new(
            schema::op_fields(),
            vec![
                Arc::new(UInt8Array::from(taken.op)) as ArrayRef,
                Arc::new(Float32Array::from(taken.magnitude)),
            ],
            None,
        )?;
        let ops_item = list_item(paug_fields[2].data_type())?;
        let ops = list_array(ops_item, taken.ops_offsets, Arc::new(ops_struct))?;
        let augs = StructArray::try_new(
            paug_fields,
            vec![
                Arc::new(crop) as ArrayRef,
                Arc::new(BooleanArray::from(taken.flip)),
                ops,
            ],
            None,
        )?;
        list_array(aug_item, taken.offsets, Arc::new(augs))
    }
}

/// Buffered `list<utf8>` column.
struct TextListColumn {
    offsets: Vec<i32>,
    values: StringBuilder,
    count: usize,
}

impl TextListColumn {
    fn new() -> Self {
        TextListColumn {
            offsets: vec![0],
            values: StringBuilder::new(),
            count: 0,
        }
    }

    fn push(&mut self, texts: &[String]) -> Result<(), FormatError> {
        for t in texts {
            self.values.append_value(t);
        }
        self.count += texts.len();
        self.offsets.push(offset(self.count)?);
        Ok(())
    }

    fn finish(&mut self) -> Result<ArrayRef, FormatError> {
        let item = list_item(&schema::list_of(DataType::Utf8))?;
        let values = Arc::new(self.values.finish());
        let offsets = std::mem::replace(&mut self.offsets, vec![0]);
        self.count = 0;
        list_array(item, offsets, values)
    }
}

/// One row group being assembled, column by column, in schema order.
struct Columns {
    rows: usize,
    bytes: usize,
    key: StringBuilder,
    source: StringDictionaryBuilder<Int32Type>,
    url: StringBuilder,
    caption: StringBuilder,
    width: Vec<u32>,
    height: Vec<u32>,
    image: Option<BinaryBuilder>,
    paug: Option<PaugColumn>,
    image_emb: Option<EmbColumn>,
    text_emb: Option<EmbColumn>,
    syn: Vec<(TextListColumn, Option<EmbColumn>)>,
}

impl Columns {
    fn new(layout: &Layout) -> Self {
        // arrow_schema() already refused embedding columns without `emb`, so the fallback dim is
        // never used; it only avoids a panic path.
        let emb = layout.emb.unwrap_or(EmbLayout {
            dim: 1,
            dtype: EmbDtype::F16,
        });
        Columns {
            rows: 0,
            bytes: 0,
            key: StringBuilder::new(),
            source: StringDictionaryBuilder::new(),
            url: StringBuilder::new(),
            caption: StringBuilder::new(),
            width: Vec::new(),
            height: Vec::new(),
            image: layout.embed_images.then(BinaryBuilder::new),
            paug: layout.paug.then(PaugColumn::new),
            image_emb: layout.image_emb.then(|| EmbColumn::new(emb)),
            text_emb: layout.text_emb.then(|| EmbColumn::new(emb)),
            syn: layout
                .syn
                .iter()
                .map(|s| {
                    (
                        TextListColumn::new(),
                        s.with_emb.then(|| EmbColumn::new(emb)),
                    )
                })
                .collect(),
        }
    }

    /// Appends a row already checked against the layout.
    fn push(&mut self, row: &Row) -> Result<(), FormatError> {
        self.key.append_value(&row.key);
        self.source.append(&row.source)?;
        self.url.append_option(row.url.as_deref());
        self.caption.append_value(&row.caption);
        self.width.push(row.width);
        self.height.push(row.height);
        if let Some(b) = &mut self.image {
            b.append_option(row.image.as_deref());
        }
        if let Some(p) = &mut self.paug {
            p.push(row)?;
        }
        if let Some(e) = &mut self.image_emb {
            e.push(&row.image_emb)?;
        }
        if let Some(e) = &mut self.text_emb {
            e.push(&row.text_emb)?;
        }
        for ((texts, emb), captions) in self.syn.iter_mut().zip(&row.syn) {
            texts.push(&captions.texts)?;
            if let Some(e) = emb {
                e.push(&captions.emb)?;
            }
        }
        self.rows += 1;
        self.bytes += row_bytes(row);
        Ok(())
    }

    /// Drains the buffers into a record batch and resets them.
    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, FormatError> {
        let mut arrays: Vec<ArrayRef> = vec![
            Arc::new(self.key.finish()),
            Arc::new(self.source.finish()),
            Arc::new(self.url.finish()),
            Arc::new(self.caption.finish()),
            Arc::new(UInt32Array::from(std::mem::take(&mut self.width))),
            Arc::new(UInt32Array::from(std::mem::take(&mut self.height))),
        ];
        if let Some(b) = &mut self.image {
            arrays.push(Arc::new(b.finish()));
        }
        if let Some(p) = &mut self.paug {
            arrays.push(p.finish()?);
        }
        if let Some(e) = &mut self.image_emb {
            arrays.push(e.finish()?);
        }
        if let Some(e) = &mut self.text_emb {
            arrays.push(e.finish()?);
        }
        for (texts, emb) in &mut self.syn {
            arrays.push(texts.finish()?);
            if let Some(e) = emb {
                arrays.push(e.finish()?);
            }
        }
        self.rows = 0;
        self.bytes = 0;
        Ok(RecordBatch::try_new(Arc::clone(schema), arrays)?)
    }
}

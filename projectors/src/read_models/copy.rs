//! Appending rows: binary `COPY` for bulk batches, one `INSERT … SELECT FROM
//! UNNEST` for live ones.
//!
//! An event log gets thousands of new rows per batch; `INSERT … SELECT FROM
//! UNNEST` spends most of its time unpacking one array per column and inserting
//! row by row, while `COPY` in binary format writes whole pages at once (about
//! three times the rows per second here). Rows are encoded in the projector's
//! own process, inside the batch's transaction, so they commit or roll back
//! with everything else.
//!
//! But `COPY` costs two writes on the socket before the server answers (the
//! data, then `CopyDone`), and sqlx 0.9 leaves Nagle's algorithm on (no
//! `TCP_NODELAY`): the small second write waits until the server acknowledges
//! the first. A receiver acknowledges at once when two or more full segments
//! arrived, and delays the acknowledgement (Linux: up to 40 ms) when the data
//! fit in one. So a small `COPY` stalls, a large one does not: with full live
//! batches of 2 000 rows, `ops/bench/project.sh` measured weather (about 300 KB
//! per batch) at 74–78k events/s with `COPY` against 56k with `INSERT`, story at
//! 28–30k against 23k, while `worlds` (2 000 event ids, 44 KB) fell from about
//! 110k to 35k. [`append`] therefore copies only when the encoded rows reach
//! [`COPY_MIN_BYTES`] (well past one segment even on loopback, whose segments
//! are 64 KiB), and sends anything smaller as one `INSERT` (one message, one
//! round trip, no stall). [`append_with`] folds that `INSERT` into the read
//! model's next statement, so a live batch's append costs no round trip of
//! its own.

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, PgConnection};
use uuid::Uuid;

/// [`append`] uses binary `COPY` when the rows take at least this many bytes
/// in its format, and one `INSERT … UNNEST` below it.
pub const COPY_MIN_BYTES: usize = 192 * 1024;

/// One column of the rows to append: its values, one per row.
#[derive(Debug, Clone, Copy)]
pub enum Values<'a> {
    Uuid(&'a [Uuid]),
    Text(&'a [String]),
    /// Text from a fixed vocabulary (enum names).
    Name(&'a [&'static str]),
    Int4(&'a [i32]),
    Int8(&'a [i64]),
    Timestamptz(&'a [DateTime<Utc>]),
    Jsonb(&'a [serde_json::Value]),
}

impl<'a> Values<'a> {
    fn len(&self) -> usize {
        match self {
            Values::Uuid(v) => v.len(),
            Values::Text(v) => v.len(),
            Values::Name(v) => v.len(),
            Values::Int4(v) => v.len(),
            Values::Int8(v) => v.len(),
            Values::Timestamptz(v) => v.len(),
            Values::Jsonb(v) => v.len(),
        }
    }

    fn array_type(&self) -> &'static str {
        match self {
            Values::Uuid(_) => "uuid[]",
            Values::Text(_) | Values::Name(_) => "text[]",
            Values::Int4(_) => "int[]",
            Values::Int8(_) => "bigint[]",
            Values::Timestamptz(_) => "timestamptz[]",
            Values::Jsonb(_) => "jsonb[]",
        }
    }

    /// The bytes these values take in binary `COPY` (each field's 4-byte
    /// length, then its value), counting a `jsonb` value by its framing only:
    /// measuring it would mean serialising it. Enough to choose the statement.
    fn copy_bytes_at_least(&self) -> usize {
        const LENGTH: usize = 4;
        match self {
            Values::Uuid(v) => v.len() * (LENGTH + 16),
            Values::Text(v) => v.iter().map(|text| LENGTH + text.len()).sum(),
            Values::Name(v) => v.iter().map(|name| LENGTH + name.len()).sum(),
            Values::Int4(v) => v.len() * (LENGTH + 4),
            Values::Int8(v) => v.len() * (LENGTH + 8),
            Values::Timestamptz(v) => v.len() * (LENGTH + 8),
            Values::Jsonb(v) => v.len() * (LENGTH + 1),
        }
    }

    fn bind_to<'q>(&self, query: PgQuery<'q>) -> PgQuery<'q>
    where
        'a: 'q,
    {
        match *self {
            Values::Uuid(v) => query.bind(v),
            Values::Text(v) => query.bind(v),
            Values::Name(v) => query.bind(v),
            Values::Int4(v) => query.bind(v),
            Values::Int8(v) => query.bind(v),
            Values::Timestamptz(v) => query.bind(v),
            Values::Jsonb(v) => query.bind(v),
        }
    }

    fn write(&self, rows: &mut BinaryRows, row: usize) {
        match self {
            Values::Uuid(v) => rows.uuid(v[row]),
            Values::Text(v) => rows.text(&v[row]),
            Values::Name(v) => rows.text(v[row]),
            Values::Int4(v) => rows.int4(v[row]),
            Values::Int8(v) => rows.int8(v[row]),
            Values::Timestamptz(v) => rows.timestamptz(v[row]),
            Values::Jsonb(v) => rows.jsonb(&v[row]),
        };
    }
}

/// How [`append`] sends a set of rows.
enum Plan {
    Nothing,
    /// Binary `COPY` of `rows` rows taking at least `bytes` in its format.
    Copy {
        rows: usize,
        bytes: usize,
    },
    /// One `INSERT … SELECT FROM UNNEST`.
    Insert,
}

impl Plan {
    fn of(columns: &[(&'static str, Values<'_>)]) -> Plan {
        let rows = columns.first().map_or(0, |(_, values)| values.len());
        if rows == 0 {
            return Plan::Nothing;
        }
        // Each row also starts with its 2-byte field count.
        let bytes = rows * 2
            + columns
                .iter()
                .map(|(_, values)| values.copy_bytes_at_least())
                .sum::<usize>();
        if bytes >= COPY_MIN_BYTES {
            Plan::Copy { rows, bytes }
        } else {
            Plan::Insert
        }
    }
}

/// Appends rows to `table` (resolved by the connection's search path), given
/// as `(column, values)` pairs of equal length, and returns how many it wrote.
/// Table and column names are the read model's own constants.
pub async fn append(
    tx: &mut PgConnection,
    table: &'static str,
    columns: &[(&'static str, Values<'_>)],
) -> Result<u64, sqlx::Error> {
    match Plan::of(columns) {
        Plan::Nothing => Ok(0),
        Plan::Copy { rows, bytes } => copy_rows(tx, table, columns, rows, bytes).await,
        Plan::Insert => {
            let sql = unnest_insert(table, columns, 0);
            let mut insert = sqlx::query(AssertSqlSafe(sql));
            for (_, values) in columns {
                insert = values.bind_to(insert);
            }
            Ok(insert.execute(&mut *tx).await?.rows_affected())
        }
    }
}

/// [`append`] and then `then` (a statement whose parameters `bind` binds), in
/// as few round trips as the rows allow. Rows that [`append`] would send as
/// one `INSERT` become a data-modifying `WITH` in front of `then` (which
/// PostgreSQL runs once and in full, whether or not `then` reads it): one
/// statement, one round trip, where a live batch paid two. Rows for a `COPY`
/// are copied first and `then` follows on its own.
///
/// `then` may start with its own `WITH`; its parameters are `$1` up to the
/// highest it names, and the rows' come after them. It must not read `table`:
/// a `WITH` and its statement see the same snapshot, so it would not see the
/// rows appended beside it.
pub async fn append_with<'q>(
    tx: &mut PgConnection,
    table: &'static str,
    columns: &[(&'static str, Values<'q>)],
    then: &'static str,
    bind: impl FnOnce(PgQuery<'q>) -> PgQuery<'q>,
) -> Result<(), sqlx::Error> {
    let statement = match Plan::of(columns) {
        Plan::Insert => {
            let sql = appending_before(table, columns, then);
            let mut statement = bind(sqlx::query(AssertSqlSafe(sql)));
            for (_, values) in columns {
                statement = values.bind_to(statement);
            }
            statement
        }
        Plan::Copy { rows, bytes } => {
            copy_rows(tx, table, columns, rows, bytes).await?;
            bind(sqlx::query(then))
        }
        Plan::Nothing => bind(sqlx::query(then)),
    };
    statement.execute(&mut *tx).await?;
    Ok(())
}

/// The rows in binary `COPY` format, copied into `table`.
async fn copy_rows(
    tx: &mut PgConnection,
    table: &'static str,
    columns: &[(&'static str, Values<'_>)],
    rows: usize,
    bytes: usize,
) -> Result<u64, sqlx::Error> {
    let fields = i16::try_from(columns.len()).unwrap_or(i16::MAX);
    let mut copy = BinaryRows::with_capacity(rows, bytes / rows);
    for row in 0..rows {
        copy.row(fields);
        for (_, values) in columns {
            values.write(&mut copy, row);
        }
    }
    copy.copy_into(tx, &format!("{table} ({})", column_names(columns)))
        .await
}

/// `then` behind a data-modifying `WITH` that appends `columns` to `table`,
/// their parameters numbered after `then`'s.
fn appending_before(table: &str, columns: &[(&'static str, Values<'_>)], then: &str) -> String {
    let appended = format!(
        "appended_{table} AS ({})",
        unnest_insert(table, columns, highest_parameter(then))
    );
    match then.trim_start().strip_prefix("WITH ") {
        Some(rest) => format!("WITH {appended}, {rest}"),
        None => format!("WITH {appended} {then}"),
    }
}

/// The highest `$n` that `sql` names (0 for none). The statements are the
/// read models' own constants, with no `$` in a string or a quoted name.
fn highest_parameter(sql: &str) -> usize {
    sql.split('$')
        .skip(1)
        .filter_map(|after| {
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            after[..digits].parse::<usize>().ok()
        })
        .max()
        .unwrap_or(0)
}

/// A query whose parameters are bound by value or by reference for `'q`.
pub type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// `INSERT INTO table (columns) SELECT * FROM UNNEST(…)` with one array
/// parameter per column, numbered after the first `skip`.
fn unnest_insert(table: &str, columns: &[(&'static str, Values<'_>)], skip: usize) -> String {
    let arrays = columns
        .iter()
        .enumerate()
        .map(|(i, (_, values))| format!("${}::{}", skip + i + 1, values.array_type()))
        .collect::<Vec<_>>()
        .join(", ");
    let names = column_names(columns);
    format!("INSERT INTO {table} ({names}) SELECT * FROM UNNEST({arrays})")
}

fn column_names(columns: &[(&'static str, Values<'_>)]) -> String {
    columns
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
pub const POSTGRES_EPOCH_US: i64 = 946_684_800_000_000;

/// Rows in PostgreSQL's binary `COPY` format.
#[derive(Debug)]
pub struct BinaryRows {
    buffer: Vec<u8>,
    rows: u64,
}

impl Default for BinaryRows {
    fn default() -> BinaryRows {
        BinaryRows::new()
    }
}

impl BinaryRows {
    /// The format's header; no rows yet.
    pub fn new() -> BinaryRows {
        BinaryRows::with_capacity(0, 0)
    }

    /// Room for `rows` rows of about `row_bytes` bytes each, so a large batch
    /// is encoded without growing (and copying) the buffer.
    pub fn with_capacity(rows: usize, row_bytes: usize) -> BinaryRows {
        let mut buffer = Vec::with_capacity((rows * row_bytes).max(1 << 12) + 21);
        buffer.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buffer.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buffer.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        BinaryRows { buffer, rows: 0 }
    }

    /// Starts a row of `fields` columns, each then written in table order.
    pub fn row(&mut self, fields: i16) -> &mut Self {
        self.rows += 1;
        self.buffer.extend_from_slice(&fields.to_be_bytes());
        self
    }

    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        // A field longer than 2 GiB cannot be stored by PostgreSQL either.
        let length = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        self.buffer.extend_from_slice(&length.to_be_bytes());
        self.buffer.extend_from_slice(bytes);
        self
    }

    pub fn null(&mut self) -> &mut Self {
        self.buffer.extend_from_slice(&(-1i32).to_be_bytes());
        self
    }

    pub fn uuid(&mut self, value: Uuid) -> &mut Self {
        self.field(value.as_bytes())
    }

    pub fn text(&mut self, value: &str) -> &mut Self {
        self.field(value.as_bytes())
    }

    pub fn int4(&mut self, value: i32) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    pub fn int8(&mut self, value: i64) -> &mut Self {
        self.field(&value.to_be_bytes())
    }

    pub fn timestamptz(&mut self, value: DateTime<Utc>) -> &mut Self {
        self.int8(value.timestamp_micros() - POSTGRES_EPOCH_US)
    }

    /// `jsonb`: a version byte (1), then the JSON text.
    pub fn jsonb(&mut self, value: &serde_json::Value) -> &mut Self {
        let mut bytes = Vec::with_capacity(64);
        bytes.push(1);
        // Serializing a `Value` into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut bytes, value);
        self.field(&bytes)
    }

    /// Rows written so far.
    pub fn len(&self) -> u64 {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The payload of one `COPY … FROM STDIN (FORMAT binary)`: the rows and
    /// the trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.buffer.extend_from_slice(&(-1i16).to_be_bytes());
        self.buffer
    }

    /// Appends the rows to `target`, a table with its column list, e.g.
    /// `"seen_events (event_id)"`, resolved by the connection's search path.
    pub async fn copy_into(self, tx: &mut PgConnection, target: &str) -> Result<u64, sqlx::Error> {
        if self.rows == 0 {
            return Ok(0);
        }
        let mut copy = tx
            .copy_in_raw(&format!("COPY {target} FROM STDIN (FORMAT binary)"))
            .await?;
        if let Err(error) = copy.send(self.finish()).await {
            copy.abort(error.to_string()).await?;
            return Err(error);
        }
        copy.finish().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_statement_then_the_rows_are_appended_in_a_with_in_front_of_it() {
        let ids = [Uuid::nil()];
        let ticks = [7_i64];
        let columns = [
            ("event_id", Values::Uuid(&ids)),
            ("tick", Values::Int8(&ticks)),
        ];
        let plain = "INSERT INTO totals SELECT * FROM UNNEST($1::text[], $2::bigint[])";
        assert_eq!(
            appending_before("log", &columns, plain),
            "WITH appended_log AS (INSERT INTO log (event_id, tick) \
             SELECT * FROM UNNEST($3::uuid[], $4::bigint[])) \
             INSERT INTO totals SELECT * FROM UNNEST($1::text[], $2::bigint[])"
        );
        let with_its_own =
            "\n  WITH b AS (SELECT * FROM UNNEST($1::text[])) INSERT INTO totals SELECT * FROM b";
        assert_eq!(
            appending_before("log", &columns, with_its_own),
            "WITH appended_log AS (INSERT INTO log (event_id, tick) \
             SELECT * FROM UNNEST($2::uuid[], $3::bigint[])), \
             b AS (SELECT * FROM UNNEST($1::text[])) INSERT INTO totals SELECT * FROM b"
        );
    }

    #[test]
    fn given_a_statement_then_its_highest_parameter_numbers_the_rows_after_it() {
        assert_eq!(highest_parameter("SELECT 1"), 0);
        assert_eq!(
            highest_parameter("SELECT $2::int, $12::text[], $1, $10::bigint"),
            12
        );
    }

    #[test]
    fn given_a_row_when_encoded_then_fields_carry_their_lengths_and_nulls_minus_one() {
        let mut rows = BinaryRows::new();
        rows.row(2).int4(7).null();
        assert_eq!(rows.len(), 1);
        let mut expected = b"PGCOPY\n\xff\r\n\0".to_vec();
        expected.extend_from_slice(&[0; 8]);
        expected.extend_from_slice(&2i16.to_be_bytes());
        expected.extend_from_slice(&4i32.to_be_bytes());
        expected.extend_from_slice(&7i32.to_be_bytes());
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(rows.buffer, expected);
    }

    #[test]
    fn given_the_postgres_epoch_when_encoded_then_it_is_zero_microseconds() {
        let mut rows = BinaryRows::new();
        let epoch = DateTime::parse_from_rfc3339("2000-01-01T00:00:00Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default();
        rows.row(1).timestamptz(epoch);
        assert!(rows.buffer.ends_with(&0i64.to_be_bytes()));
    }

    #[test]
    fn given_rows_when_encoded_for_binary_copy_then_header_fields_and_trailer_follow_the_format() {
        let mut copy = BinaryRows::new();
        let epoch = DateTime::from_timestamp_millis(946_684_800_000).unwrap_or_default();
        copy.row(2).int4(7).timestamptz(epoch);
        let bytes = copy.finish();
        let mut expected = b"PGCOPY\n\xff\r\n\0".to_vec();
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0, 2]);
        expected.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 7]);
        expected.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn given_columns_without_jsonb_when_sized_then_the_size_is_what_copy_encodes() {
        let ids = [Uuid::from_u128(1), Uuid::from_u128(2)];
        let names = ["north".to_owned(), "a-longer-region".to_owned()];
        let kinds = ["rain", "clear"];
        let counts = [7, -1];
        let ticks = [0, i64::MAX];
        let columns = [
            Values::Uuid(&ids),
            Values::Text(&names),
            Values::Name(&kinds),
            Values::Int4(&counts),
            Values::Int8(&ticks),
        ];
        let mut copy = BinaryRows::new();
        for row in 0..2 {
            copy.row(5);
            for values in &columns {
                values.write(&mut copy, row);
            }
        }
        let header_and_trailer = 19 + 2;
        let sized = 2 * 2
            + columns
                .iter()
                .map(Values::copy_bytes_at_least)
                .sum::<usize>();
        assert_eq!(copy.finish().len() - header_and_trailer, sized);
    }

    #[test]
    fn given_json_when_encoded_as_jsonb_then_the_version_byte_comes_first() {
        let mut copy = BinaryRows::new();
        copy.row(1).jsonb(&serde_json::json!({}));
        let bytes = copy.finish();
        assert_eq!(&bytes[19..28], &[0, 1, 0, 0, 0, 3, 1, b'{', b'}']);
    }
}

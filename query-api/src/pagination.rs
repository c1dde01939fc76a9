//! Keyset pagination with opaque cursors.
//!
//! Every list is ordered by its natural key plus a unique tiebreaker, and a page
//! continues strictly after the key of the previous page's last item. Unlike
//! `OFFSET`, a row appended meanwhile never shifts a page (no duplicates, no
//! gaps) and page N costs the same as page 1.
//!
//! A cursor is the base64url (no padding) encoding of `["<list>", <key>]`. The
//! list name makes a cursor from one endpoint a 400 on another rather than a
//! silently wrong page. Clients must treat cursors as opaque.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

use crate::error::ApiError;

/// Longest accepted cursor; real ones are far shorter (a few keys).
pub const MAX_CURSOR_LEN: usize = 1024;

/// One page of a list.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    /// The items of this page, in the list's stable order.
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

/// The `limit` and decoded `cursor` of a list request.
#[derive(Debug, Clone, PartialEq)]
pub struct PageRequest<K> {
    /// Largest number of items to return.
    pub limit: i64,
    /// Where the previous page ended; `None` for the first page.
    pub after: Option<K>,
}

impl<K> PageRequest<K> {
    /// How many rows to fetch: one more than the page, to learn whether a next
    /// page exists without a second query.
    pub fn fetch(&self) -> i64 {
        self.limit + 1
    }
}

/// Parses `limit` and `cursor` for the list named `list`.
pub fn request<K: DeserializeOwned>(
    list: &str,
    limit: Option<&str>,
    cursor: Option<&str>,
) -> Result<PageRequest<K>, ApiError> {
    Ok(PageRequest {
        limit: crate::params::limit(limit)?,
        after: cursor.map(|raw| decode(list, raw)).transpose()?,
    })
}

/// Turns `limit + 1` fetched rows into a page: the extra row, if any, only says
/// that a next page exists, whose cursor is the key of the last kept item.
pub fn page<T, K: Serialize>(
    list: &str,
    mut rows: Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> K,
) -> Page<T> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|last| encode(list, &key(last)))
    } else {
        None
    };
    Page {
        items: rows,
        next_cursor,
    }
}

/// The cursor that continues `list` after `key`.
pub fn encode<K: Serialize>(list: &str, key: &K) -> String {
    // Serializing plain keys (strings, integers, uuids, timestamps) cannot fail.
    let json = serde_json::to_vec(&(list, key)).unwrap_or_default();
    URL_SAFE_NO_PAD.encode(json)
}

/// The key inside a cursor of `list`.
pub fn decode<K: DeserializeOwned>(list: &str, raw: &str) -> Result<K, ApiError> {
    let invalid = |why: &str| {
        ApiError::bad(
            "cursor",
            format!("cursor is not a cursor of this list ({why}); pass next_cursor unchanged"),
        )
    };
    if raw.len() > MAX_CURSOR_LEN {
        return Err(invalid("too long"));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(raw)
        .map_err(|_| invalid("not base64url"))?;
    let (name, key): (String, K) =
        serde_json::from_slice(&bytes).map_err(|_| invalid("malformed"))?;
    if name != list {
        return Err(invalid("it belongs to another list"));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_key_when_encoded_then_it_decodes_back_only_for_its_list() {
        let key = (42_i64, "north".to_owned());
        let cursor = encode("history", &key);
        assert!(
            cursor
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_eq!(decode::<(i64, String)>("history", &cursor).unwrap(), key);
        assert!(decode::<(i64, String)>("choices", &cursor).is_err());
    }

    #[test]
    fn given_garbage_when_decoded_then_a_bad_cursor_parameter() {
        for bad in [
            "",
            "%%%",
            "' OR 1=1 --",
            &"A".repeat(MAX_CURSOR_LEN + 1),
            &encode("history", &"wrong type"),
        ] {
            match decode::<(i64, String)>("history", bad) {
                Err(ApiError::BadRequest { parameter, .. }) => assert_eq!(parameter, "cursor"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn given_one_row_more_than_the_limit_then_a_next_cursor_after_the_last_kept_item() {
        let page = page("n", vec![1, 2, 3], 2, |n| *n);
        assert_eq!(page.items, vec![1, 2]);
        assert_eq!(decode::<i32>("n", &page.next_cursor.unwrap()).unwrap(), 2);
    }

    #[test]
    fn given_at_most_limit_rows_then_the_last_page() {
        let page = page("n", vec![1, 2], 2, |n| *n);
        assert_eq!(page.items, vec![1, 2]);
        assert_eq!(page.next_cursor, None);
    }

    #[test]
    fn given_limit_and_cursor_strings_then_a_page_request() {
        let cursor = encode("n", &5);
        let request: PageRequest<i32> = request("n", Some("10"), Some(&cursor)).unwrap();
        assert_eq!(request.limit, 10);
        assert_eq!(request.after, Some(5));
        assert_eq!(request.fetch(), 11);
    }
}

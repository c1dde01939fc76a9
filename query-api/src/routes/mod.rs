//! One module per read model, each with its own `router()`.
//!
//! A [`Resource`] pairs a router with the projectors whose read models it
//! serves, so layers that depend on them (read-your-writes waits, lag headers)
//! can wrap exactly its routes; see [`crate::app_with`].
//!
//! Conventions shared by every route:
//! - an unknown world is a 404 problem;
//! - a single resource the world does not have (yet) is a 404 whose detail says so;
//! - a list the world has nothing in is `200 {"items": [], "next_cursor": null}`.

pub mod clock;
pub mod inference;
pub mod projectors;
pub mod state;
pub mod story;
pub mod weather;
pub mod worlds;

use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use worldline_schemas::WorldId;

use crate::error::ApiError;
use crate::pagination::Page;
use crate::{AppState, Readers};

/// The routes serving one or more projectors' read models.
pub struct Resource {
    /// The projectors (and Postgres schemas) whose read models these routes
    /// read: a read-your-writes wait waits for every one of them.
    pub projectors: &'static [&'static str],
    /// The routes, documented.
    pub router: OpenApiRouter<AppState>,
}

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resource")
            .field("projectors", &self.projectors)
            .finish_non_exhaustive()
    }
}

/// Every resource of the API.
pub fn resources() -> Vec<Resource> {
    vec![
        Resource {
            projectors: &[worlds::PROJECTOR],
            router: worlds::router(),
        },
        Resource {
            projectors: &[clock::PROJECTOR],
            router: clock::router(),
        },
        Resource {
            projectors: &[weather::PROJECTOR],
            router: weather::router(),
        },
        Resource {
            projectors: &[story::PROJECTOR],
            router: story::router(),
        },
        Resource {
            projectors: &[inference::PROJECTOR],
            router: inference::router(),
        },
        Resource {
            projectors: state::PROJECTORS,
            router: state::router(),
        },
        Resource {
            projectors: &[projectors::PROJECTOR],
            router: projectors::router(),
        },
    ]
}

/// Every resource's routes in one router (what the document is generated from).
pub fn api() -> OpenApiRouter<AppState> {
    resources()
        .into_iter()
        .fold(OpenApiRouter::new(), |api, resource| {
            api.merge(resource.router)
        })
}

/// The `{world}` path segment.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct WorldPath {
    /// World id: 1–128 characters of `[A-Za-z0-9._-]`.
    #[param(pattern = "^[A-Za-z0-9._-]{1,128}$", min_length = 1, max_length = 128)]
    pub world: String,
}

impl WorldPath {
    /// The validated world id.
    pub fn world(&self) -> Result<WorldId, ApiError> {
        crate::params::world(&self.world)
    }
}

/// The paging parameters every list accepts.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Page size, 1–500 (default 50).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 500)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page, unchanged; absent for the first page.
    /// Opaque: anything the server did not make is a 400, so the document gives
    /// no shape for it (the server also refuses one over 1024 characters).
    pub cursor: Option<String>,
}

/// A tick range; both ends inclusive.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TickRangeQuery {
    /// First tick of the range (inclusive, default 0).
    #[param(value_type = Option<i64>, minimum = 0, maximum = 9223372036854775807i64)]
    pub from_tick: Option<String>,
    /// Last tick of the range (inclusive, default: no bound). A range ending
    /// before it starts is empty.
    #[param(value_type = Option<i64>, minimum = 0, maximum = 9223372036854775807i64)]
    pub to_tick: Option<String>,
}

/// Whether the worlds read model knows `world`.
pub async fn world_exists(readers: &Readers, world: &WorldId) -> Result<bool, ApiError> {
    Ok(readers
        .fetch_scalar(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM worlds.worlds WHERE world_id = $1)")
                .bind(world.as_str()),
        )
        .await?)
}

/// A found single resource, or the right 404: unknown world, or `missing`.
///
/// The resource is read first so the common case costs one query; the world is
/// only looked up to explain a miss.
pub async fn found<T>(
    readers: &Readers,
    world: &WorldId,
    row: Option<T>,
    missing: impl FnOnce() -> String,
) -> Result<T, ApiError> {
    match row {
        Some(row) => Ok(row),
        None if world_exists(readers, world).await? => Err(ApiError::NotFound(missing())),
        None => Err(ApiError::unknown_world(world.as_str())),
    }
}

/// A page as is, unless it is empty because the world does not exist.
pub async fn listed<T>(
    readers: &Readers,
    world: &WorldId,
    page: Page<T>,
) -> Result<Page<T>, ApiError> {
    if page.items.is_empty() && !world_exists(readers, world).await? {
        return Err(ApiError::unknown_world(world.as_str()));
    }
    Ok(page)
}

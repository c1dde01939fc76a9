//! The OpenAPI 3.1 document, generated from the handlers' annotations, and a
//! self-contained docs page.
//!
//! Error responses are added here, once, rather than on every handler: every
//! operation can answer 400 (a bad parameter) and 503 (read model unavailable),
//! and every operation under `/v1/worlds/{world}` can answer 404. Every `/v1`
//! operation also needs a bearer token (401, 403, 429), refuses a declared
//! body over the size limit (413), accepts the `X-Consistency-Token` header
//! (read-your-writes; 503 past the wait) and reports its read model's position
//! and lag in headers. Headers the guards always send are marked required, so
//! a conformance check holds the server to them.

use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr};
use utoipa::{OpenApi as _, PartialSchema};

use crate::consistency::{LAG_HEADER, POSITION_HEADER};
use crate::error::{PROBLEM_JSON, Problem};

/// The document's static parts; paths come from the routers.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "worldline query API",
        description = "Read models of persistent game worlds, built from the event log.\n\n\
            Lists are paginated with opaque cursors: pass a page's `next_cursor` as `cursor` \
            to get the next one (`null` on the last page). `limit` is 1–500, default 50.\n\n\
            Errors are `application/problem+json` (RFC 9457); a bad parameter is a 400 whose \
            `parameter` names it. An unknown world is a 404; a world without the requested \
            single resource is a 404 saying so; a list the world has nothing in is empty.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    components(schemas(Problem)),
    tags(
        (name = "worlds", description = "Every world, its status and event counts"),
        (name = "clock", description = "Where each world's clock stands"),
        (name = "weather", description = "Weather now, as of a tick, and its history"),
        (name = "story", description = "Story progress, the choices log and node tallies"),
        (name = "inference", description = "The model inference log and per-model statistics"),
        (name = "stream", description = "Live changes of a world's read models (Server-Sent Events)"),
        (name = "projectors", description = "Where every projector stands: position, lag, dead letters")
    )
)]
struct ApiDoc;

const BAD_REQUEST: &str = "BadRequest";
const NOT_FOUND: &str = "NotFound";
const UNAVAILABLE: &str = "Unavailable";
const UNAUTHORIZED: &str = "Unauthorized";
const FORBIDDEN: &str = "Forbidden";
const TOO_MANY_REQUESTS: &str = "TooManyRequests";
const PAYLOAD_TOO_LARGE: &str = "PayloadTooLarge";
/// The security scheme every `/v1` operation requires.
const BEARER: &str = "bearer";

/// The full document: `paths` from the routers merged into the static parts,
/// with the shared error responses on every operation.
pub fn document(paths: OpenApi) -> OpenApi {
    let mut doc = ApiDoc::openapi().merge_from(paths);
    register_problem_responses(&mut doc);
    register_security(&mut doc);
    for (path, item) in doc.paths.paths.iter_mut() {
        let in_world = path.starts_with("/v1/worlds/{world}");
        let guarded = path.starts_with("/v1/");
        for operation in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            add_problem_responses(operation, in_world);
            if guarded {
                add_guard_documentation(operation);
                add_position_headers(operation);
            }
        }
    }
    doc
}

fn problem_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            PROBLEM_JSON,
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

/// A response header; `required` when every answer of that status carries it.
fn header_of(
    schema: impl Into<RefOr<utoipa::openapi::schema::Schema>>,
    required: bool,
    description: &str,
) -> RefOr<utoipa::openapi::Header> {
    let mut header = utoipa::openapi::HeaderBuilder::new()
        .schema(Some(schema))
        .description(Some(description))
        .build();
    // utoipa's `Header` has no `required` of its own; extensions are written
    // into the header object as they are.
    if required {
        let mut extensions = utoipa::openapi::extensions::Extensions::default();
        extensions.insert("required".to_owned(), serde_json::Value::Bool(true));
        header.extensions = Some(extensions);
    }
    RefOr::T(header)
}

fn register_problem_responses(doc: &mut OpenApi) {
    // Every 429 and 503 says when to come back (guard, consistency wait, error).
    let retry_after = || {
        header_of(
            utoipa::openapi::ObjectBuilder::new()
                .schema_type(utoipa::openapi::schema::Type::Integer)
                .minimum(Some(1)),
            true,
            "Seconds to wait before retrying",
        )
    };
    // Every 401 and 403 carries a challenge (RFC 6750).
    let challenge = |description: &str| header_of(String::schema(), true, description);
    let mut unavailable = problem_response(
        "The read-model database is unreachable, the request took too long, or the \
         read model did not reach X-Consistency-Token within the wait; retry later",
    );
    unavailable
        .headers
        .insert(header::RETRY_AFTER.as_str().to_owned(), retry_after());
    let mut unauthorized = problem_response(
        "No bearer token, or one that is not valid (expired, wrong audience, unknown)",
    );
    unauthorized.headers.insert(
        header::WWW_AUTHENTICATE.as_str().to_owned(),
        challenge(
            "Bearer realm=\"worldline\" (with error=\"invalid_token\" when a token was presented)",
        ),
    );
    let mut forbidden = problem_response("The token does not have the `read` scope");
    forbidden.headers.insert(
        header::WWW_AUTHENTICATE.as_str().to_owned(),
        challenge("Bearer realm=\"worldline\", error=\"insufficient_scope\", scope=\"read\""),
    );
    let mut too_many = problem_response("The token is over its request rate");
    too_many
        .headers
        .insert(header::RETRY_AFTER.as_str().to_owned(), retry_after());
    let components = doc.components.get_or_insert_with(Default::default);
    for (name, response) in [
        (
            BAD_REQUEST,
            problem_response("A path segment or query parameter is invalid; `parameter` names it"),
        ),
        (
            NOT_FOUND,
            problem_response("The world does not exist, or has no such resource"),
        ),
        (UNAVAILABLE, unavailable),
        (UNAUTHORIZED, unauthorized),
        (FORBIDDEN, forbidden),
        (TOO_MANY_REQUESTS, too_many),
        (
            PAYLOAD_TOO_LARGE,
            problem_response("The request declares a body (`Content-Length`) over the size limit"),
        ),
    ] {
        components
            .responses
            .insert(name.to_owned(), RefOr::T(response));
    }
}

fn add_problem_responses(operation: &mut Operation, in_world: bool) {
    let responses = &mut operation.responses.responses;
    let mut add = |status: &str, name: &str| {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::Ref(Ref::from_response_name(name)));
    };
    add("400", BAD_REQUEST);
    if in_world {
        add("404", NOT_FOUND);
    }
    add("503", UNAVAILABLE);
}

fn register_security(doc: &mut OpenApi) {
    use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
    let mut scheme = Http::new(HttpAuthScheme::Bearer);
    scheme.description = Some(
        "A static token from `auth.tokens`, or a JWT (HS256/RS256) whose `scope` claim \
         includes `read`; a token limited to some worlds sees others as unknown (404)."
            .to_owned(),
    );
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(BEARER, SecurityScheme::Http(scheme));
}

/// Bearer auth, its answers, and the read-your-writes header on one `/v1` operation.
fn add_guard_documentation(operation: &mut Operation) {
    use utoipa::openapi::Required;
    use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
    use utoipa::openapi::security::SecurityRequirement;
    operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
    let responses = &mut operation.responses.responses;
    for (status, name) in [
        ("401", UNAUTHORIZED),
        ("403", FORBIDDEN),
        ("413", PAYLOAD_TOO_LARGE),
        ("429", TOO_MANY_REQUESTS),
        ("503", UNAVAILABLE),
    ] {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::Ref(Ref::from_response_name(name)));
    }
    let consistency = ParameterBuilder::new()
        .name("X-Consistency-Token")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(
            "`consistency_token` of an append (`wl1.…`): the answer waits (bounded, default \
             2 s) until this read model has applied those events; 503 past the wait.",
        ))
        .schema(Some(
            utoipa::openapi::ObjectBuilder::new()
                .schema_type(utoipa::openapi::schema::Type::String)
                .pattern(Some("^wl1\\.[A-Za-z0-9_-]+$"))
                .max_length(Some(16 * 1024)),
        ))
        .build();
    operation
        .parameters
        .get_or_insert_with(Vec::new)
        .push(RefOr::T(consistency));
}

/// The read model's position and lag, which the read-your-writes layer adds to
/// every answer it lets through (not to the guards' own refusals), on each
/// success response. Optional: a resource with no projector to report on has
/// neither.
fn add_position_headers(operation: &mut Operation) {
    let count = || {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::Integer)
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::Int64,
            )))
            .minimum(Some(0))
    };
    let position = header_of(
        count(),
        false,
        "The stored next offsets of the projectors behind this answer, summed over \
         their partitions: it only grows",
    );
    let lag = header_of(
        count(),
        false,
        "Records the furthest-behind projector behind this answer has yet to apply, \
         as of the log ends it last saw",
    );
    for (status, response) in operation.responses.responses.iter_mut() {
        if let (true, RefOr::T(response)) = (status.starts_with('2'), response) {
            response
                .headers
                .insert(POSITION_HEADER.to_owned(), position.clone());
            response.headers.insert(LAG_HEADER.to_owned(), lag.clone());
        }
    }
}

/// `/openapi.json` and `/docs`.
pub fn router(doc: &OpenApi) -> Router {
    let json = doc.to_json().unwrap_or_else(|_| "{}".to_owned());
    let page = docs_page(&json);
    Router::new()
        .route(
            "/openapi.json",
            get(move || {
                let json = json.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], json).into_response() }
            }),
        )
        .route(
            "/docs",
            get(move || {
                let page = page.clone();
                async move { Html(page) }
            }),
        )
}

/// The docs page with the document inlined: it renders without fetching
/// anything, so it works offline and behind strict content policies.
fn docs_page(json: &str) -> String {
    // `</` inside a script element would end it early; `<\/` is the same JSON.
    let inline = json.replace("</", "<\\/");
    DOCS_TEMPLATE.replace("/*SPEC*/", &inline)
}

const DOCS_TEMPLATE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>worldline query API</title>
<style>
  body { font: 15px/1.5 system-ui, sans-serif; margin: 0 auto; max-width: 62rem; padding: 1rem 1.5rem; color: #1d2330; }
  h1 { margin-bottom: .2rem; } h2 { margin-top: 2rem; border-bottom: 1px solid #d5d9e2; }
  .op { border: 1px solid #d5d9e2; border-radius: 6px; margin: .8rem 0; }
  .op > summary { cursor: pointer; padding: .5rem .8rem; list-style: none; }
  .op[open] > summary { border-bottom: 1px solid #d5d9e2; }
  .body { padding: .2rem .9rem .8rem; }
  .method { display: inline-block; min-width: 3.5rem; font-weight: 700; color: #1b6e3a; text-transform: uppercase; }
  code, .path { font-family: ui-monospace, monospace; }
  table { border-collapse: collapse; width: 100%; font-size: 14px; }
  th, td { text-align: left; vertical-align: top; padding: .25rem .5rem; border-bottom: 1px solid #eceef3; }
  .muted { color: #5b6475; } pre { background: #f5f6f9; padding: .6rem; overflow-x: auto; }
</style>
</head>
<body>
<h1 id="title"></h1>
<p class="muted">OpenAPI <span id="version"></span> · <a href="/openapi.json">/openapi.json</a></p>
<div id="description"></div>
<main id="ops"></main>
<script id="spec" type="application/json">/*SPEC*/</script>
<script>
"use strict";
const spec = JSON.parse(document.getElementById("spec").textContent);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) node.append(child);
  return node;
};
const resolve = (x) => {
  if (!x || !x.$ref) return x;
  return x.$ref.split("/").slice(1).reduce((o, k) => o[k], spec);
};
const typeOf = (schema) => {
  schema = resolve(schema) || {};
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.enum) return schema.enum.join(" | ");
  const t = Array.isArray(schema.type) ? schema.type.join(" | ") : (schema.type || "");
  return t + (schema.format ? " (" + schema.format + ")" : "");
};
document.getElementById("title").textContent = spec.info.title;
document.getElementById("version").textContent = spec.openapi;
for (const para of (spec.info.description || "").split("\n\n")) {
  document.getElementById("description").append(el("p", {}, para));
}
const byTag = new Map((spec.tags || []).map((t) => [t.name, { tag: t, ops: [] }]));
for (const [path, item] of Object.entries(spec.paths)) {
  for (const method of ["get", "put", "post", "delete", "patch"]) {
    const op = item[method];
    if (!op) continue;
    const tag = (op.tags && op.tags[0]) || "other";
    if (!byTag.has(tag)) byTag.set(tag, { tag: { name: tag }, ops: [] });
    byTag.get(tag).ops.push({ path, method, op });
  }
}
const main = document.getElementById("ops");
for (const { tag, ops } of byTag.values()) {
  main.append(el("h2", { id: tag.name }, tag.name));
  if (tag.description) main.append(el("p", { class: "muted" }, tag.description));
  for (const { path, method, op } of ops) {
    const body = el("div", { class: "body" });
    if (op.description) body.append(el("p", {}, op.description));
    const params = (op.parameters || []).map(resolve);
    if (params.length) {
      const table = el("table", {}, el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"),
        el("th", {}, "type"), el("th", {}, "description")));
      for (const p of params) {
        const s = p.schema || {};
        const limits = [s.pattern && "pattern " + s.pattern, s.minimum !== undefined && "≥ " + s.minimum,
          s.maximum !== undefined && "≤ " + s.maximum].filter(Boolean).join(", ");
        table.append(el("tr", {}, el("td", {}, el("code", {}, p.name + (p.required ? " *" : ""))),
          el("td", {}, p.in), el("td", {}, typeOf(s)),
          el("td", {}, (p.description || "") + (limits ? " (" + limits + ")" : ""))));
      }
      body.append(table);
    }
    const responses = el("table", {}, el("tr", {}, el("th", {}, "status"), el("th", {}, "description"), el("th", {}, "body")));
    for (const [status, raw] of Object.entries(op.responses || {})) {
      const r = resolve(raw) || {};
      const [type, content] = Object.entries(r.content || {})[0] || ["", {}];
      responses.append(el("tr", {}, el("td", {}, status), el("td", {}, r.description || ""),
        el("td", {}, type ? type + " " + typeOf(content.schema) : "")));
    }
    body.append(el("h4", {}, "Responses"), responses);
    const summary = el("summary", {}, el("span", { class: "method" }, method), " ",
      el("span", { class: "path" }, path), " ", el("span", { class: "muted" }, op.summary || ""));
    main.append(el("details", { class: "op" }, summary, body));
  }
}
</script>
</body>
</html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_spec_with_script_end_tags_when_inlined_then_the_script_cannot_be_closed_early() {
        let page = docs_page(r#"{"x":"</script><b>"}"#);
        assert!(!page.contains("</script><b>"));
        assert!(page.contains(r#"<\/script><b>"#));
    }

    #[test]
    fn given_routes_when_documented_then_every_operation_lists_its_problems() {
        let (_, paths) = crate::routes::api().split_for_parts();
        let doc = document(paths);
        let clock = doc.paths.paths["/v1/worlds/{world}/clock"]
            .get
            .as_ref()
            .unwrap();
        for status in ["200", "400", "404", "503"] {
            assert!(clock.responses.responses.contains_key(status), "{status}");
        }
        let list = doc.paths.paths["/v1/worlds"].get.as_ref().unwrap();
        assert!(!list.responses.responses.contains_key("404"));
        for status in ["401", "403", "413", "429"] {
            assert!(list.responses.responses.contains_key(status), "{status}");
        }
        assert!(list.security.is_some());
        assert!(
            list.parameters
                .iter()
                .flatten()
                .any(|p| matches!(p, RefOr::T(p) if p.name == "X-Consistency-Token"))
        );
    }

    #[test]
    fn given_the_document_then_headers_every_answer_carries_are_required() {
        let (_, paths) = crate::routes::api().split_for_parts();
        let json = serde_json::to_value(document(paths)).unwrap();
        let responses = &json["components"]["responses"];
        for (response, header) in [
            ("Unavailable", "retry-after"),
            ("TooManyRequests", "retry-after"),
            ("Unauthorized", "www-authenticate"),
            ("Forbidden", "www-authenticate"),
        ] {
            assert_eq!(
                responses[response]["headers"][header]["required"], true,
                "{response} {header}"
            );
        }
        let ok = &json["paths"]["/v1/worlds/{world}/clock"]["get"]["responses"]["200"];
        for header in [POSITION_HEADER, LAG_HEADER] {
            assert_eq!(ok["headers"][header]["schema"]["minimum"], 0, "{header}");
            assert!(ok["headers"][header].get("required").is_none(), "{header}");
        }
    }

    #[test]
    fn given_tick_parameters_then_bounded_like_a_bigint() {
        let (_, paths) = crate::routes::api().split_for_parts();
        let json = serde_json::to_value(document(paths)).unwrap();
        let history = &json["paths"]["/v1/worlds/{world}/weather/{region}/history"]["get"];
        let ticks: Vec<_> = history["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"].as_str().unwrap().ends_with("_tick"))
            .collect();
        assert_eq!(ticks.len(), 2);
        for tick in ticks {
            assert_eq!(tick["schema"]["minimum"], 0);
            assert_eq!(tick["schema"]["maximum"], i64::MAX);
        }
    }
}

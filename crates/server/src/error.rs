//! The one error shape of the API: `{"code": "...", "message": "...", "details": {...}}`.
//!
//! [`ErrorCode`] is the table of stable codes and their HTTP statuses; [`ApiError`] is what
//! handlers return; [`ApiJson`], [`ApiPath`] and [`ApiQuery`] are extractors whose
//! rejections already have this shape; [`fallback`] and [`method_not_allowed`] answer
//! unknown routes and methods; [`normalize_error_bodies`] turns any other error response
//! (one produced by a library) into the same shape.
//!
//! A 5xx response must never carry internals: [`ApiError::internal`] logs the cause and
//! the body says only `internal error` with the request id to quote to an operator.

use std::fmt;

use axum::body::Body;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::telemetry::RequestId;

/// Declares [`ErrorCode`] with its wire code and HTTP status in one table, so the three
/// can never drift apart.
macro_rules! error_codes {
    ($($(#[doc = $doc:literal])* $variant:ident = ($code:literal, $status:ident),)*) => {
        /// A stable, machine-readable error code. The wire form is snake_case
        /// ([`ErrorCode::as_str`]); clients match on it, so codes are never renamed.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum ErrorCode {
            $($(#[doc = $doc])* $variant,)*
        }

        impl ErrorCode {
            /// Every code, in table order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The wire code, e.g. `not_found`.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                }
            }

            /// The HTTP status answered with this code.
            pub const fn status(self) -> StatusCode {
                match self {
                    $(ErrorCode::$variant => StatusCode::$status,)*
                }
            }
        }
    };
}

error_codes! {
    /// 400: the request is malformed (bad JSON syntax, a bad query string or path parameter).
    BadRequest = ("bad_request", BAD_REQUEST),
    /// 422: the request is well-formed but its content breaks the rules; `details` says where.
    ValidationFailed = ("validation_failed", UNPROCESSABLE_ENTITY),
    /// 401: no credentials, or credentials that are not valid.
    Unauthenticated = ("unauthenticated", UNAUTHORIZED),
    /// 401: the email/password (or API key) pair is wrong.
    InvalidCredentials = ("invalid_credentials", UNAUTHORIZED),
    /// 401: the access token has expired; refresh it.
    TokenExpired = ("token_expired", UNAUTHORIZED),
    /// 401: the password was right; a second factor (TOTP) is required.
    MfaRequired = ("mfa_required", UNAUTHORIZED),
    /// 403: authenticated, but missing a permission; `details.permission` names it.
    Forbidden = ("forbidden", FORBIDDEN),
    /// 404: no such resource, or no such route.
    NotFound = ("not_found", NOT_FOUND),
    /// 405: the route exists but not with this method; the `Allow` header lists methods.
    MethodNotAllowed = ("method_not_allowed", METHOD_NOT_ALLOWED),
    /// 409: the request conflicts with the current state (a duplicate name, a stale version).
    Conflict = ("conflict", CONFLICT),
    /// 410: the resource existed and is gone for good (an expired link or token).
    Gone = ("gone", GONE),
    /// 413: the request body is larger than `http.body_limit_bytes`.
    PayloadTooLarge = ("payload_too_large", PAYLOAD_TOO_LARGE),
    /// 415: the body's content type is not one the endpoint accepts.
    UnsupportedMediaType = ("unsupported_media_type", UNSUPPORTED_MEDIA_TYPE),
    /// 416: the requested byte range lies outside the content.
    RangeNotSatisfiable = ("range_not_satisfiable", RANGE_NOT_SATISFIABLE),
    /// 429: too many requests; the `Retry-After` header says when to retry, in seconds.
    RateLimited = ("rate_limited", TOO_MANY_REQUESTS),
    /// 503: the server cannot serve the request now (shutting down, overloaded, timed out).
    Unavailable = ("unavailable", SERVICE_UNAVAILABLE),
    /// 500: a bug or an unexpected failure; the details are in the server log.
    Internal = ("internal", INTERNAL_SERVER_ERROR),
}

impl ErrorCode {
    /// The code for a status produced outside this table (by a library): the first code
    /// with that status, else `bad_request` for 4xx and `internal` for 5xx.
    pub fn from_status(status: StatusCode) -> ErrorCode {
        Self::ALL
            .iter()
            .copied()
            .find(|code| code.status() == status)
            .unwrap_or(if status.is_server_error() {
                ErrorCode::Internal
            } else {
                ErrorCode::BadRequest
            })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// The JSON body of every error response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApiErrorBody {
    /// The stable code to match on.
    pub code: ErrorCode,
    /// A human-readable, lowercase sentence; may change between versions.
    #[schema(example = "run 0190a4b2-7c3e-7d41-9a55-0d1f2e3a4b5c not found")]
    pub message: String,
    /// Structured facts about the error (the field that failed, the missing permission, the
    /// request id of a 500); an empty object when there are none.
    #[schema(value_type = Object)]
    pub details: Value,
}

/// An error answered to an API client. Build one with a constructor and return it from a
/// handler; it renders as [`ApiErrorBody`] with the code's status.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// The stable code; decides the status.
    pub code: ErrorCode,
    /// A human-readable, lowercase sentence.
    pub message: String,
    /// Structured facts; an object (empty when there are none).
    pub details: Value,
    /// When set, sent as the `Retry-After` header, in seconds.
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    /// An error with `code`, `message` and empty details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            details: Value::Object(Map::new()),
            retry_after_secs: None,
        }
    }

    /// Replaces the details (pass a JSON object).
    #[must_use]
    pub fn with_details(mut self, details: Value) -> Self {
        debug_assert!(details.is_object(), "error details must be a JSON object");
        self.details = details;
        self
    }

    /// Adds one entry to the details object.
    #[must_use]
    pub fn with_detail(mut self, key: &str, value: impl Into<Value>) -> Self {
        if !self.details.is_object() {
            self.details = Value::Object(Map::new());
        }
        if let Value::Object(map) = &mut self.details {
            map.insert(key.to_owned(), value.into());
        }
        self
    }

    /// Sets the `Retry-After` header, in seconds.
    #[must_use]
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// 422 `validation_failed` with `details` saying what failed, e.g.
    /// `{"fields": {"name": "must not be empty"}}`.
    pub fn validation(details: Value) -> Self {
        Self::new(ErrorCode::ValidationFailed, "validation failed").with_details(details)
    }

    /// 401 `unauthenticated`.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthenticated, message)
    }

    /// 401 `invalid_credentials`. The message does not say which half was wrong.
    pub fn invalid_credentials() -> Self {
        Self::new(ErrorCode::InvalidCredentials, "invalid credentials")
    }

    /// 401 `token_expired`.
    pub fn token_expired() -> Self {
        Self::new(ErrorCode::TokenExpired, "token expired")
    }

    /// 401 `mfa_required`.
    pub fn mfa_required() -> Self {
        Self::new(ErrorCode::MfaRequired, "a second factor is required")
    }

    /// 403 `forbidden` naming the missing `permission` (also in `details.permission`).
    pub fn forbidden(permission: &str) -> Self {
        Self::new(
            ErrorCode::Forbidden,
            format!("missing permission {permission}"),
        )
        .with_detail("permission", permission)
    }

    /// 404 `not_found` for a resource of `kind` (e.g. `run`) with `id`; both are in
    /// `details`.
    pub fn not_found(kind: &str, id: impl fmt::Display) -> Self {
        let id = id.to_string();
        Self::new(ErrorCode::NotFound, format!("{kind} {id} not found"))
            .with_detail("kind", kind)
            .with_detail("id", id)
    }

    /// 405 `method_not_allowed`.
    pub fn method_not_allowed(method: &Method) -> Self {
        Self::new(
            ErrorCode::MethodNotAllowed,
            format!("method {method} is not allowed on this route"),
        )
        .with_detail("method", method.as_str())
    }

    /// 409 `conflict`.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    /// 410 `gone`.
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Gone, message)
    }

    /// 413 `payload_too_large`; `details.limit_bytes` is the limit when known.
    pub fn payload_too_large(limit_bytes: Option<usize>) -> Self {
        let error = Self::new(ErrorCode::PayloadTooLarge, "request body is too large");
        match limit_bytes {
            Some(limit) => error.with_detail("limit_bytes", limit),
            None => error,
        }
    }

    /// 415 `unsupported_media_type`; `expected` is the accepted type, e.g.
    /// `application/json`.
    pub fn unsupported_media_type(expected: &str) -> Self {
        Self::new(
            ErrorCode::UnsupportedMediaType,
            format!("expected content type {expected}"),
        )
        .with_detail("expected", expected)
    }

    /// 416 `range_not_satisfiable`.
    pub fn range_not_satisfiable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::RangeNotSatisfiable, message)
    }

    /// 429 `rate_limited` with `Retry-After: retry_after_secs`.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self::new(ErrorCode::RateLimited, "too many requests")
            .with_detail("retry_after_secs", retry_after_secs)
            .with_retry_after(retry_after_secs)
    }

    /// 503 `unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    /// 500 `internal`. Logs `error` with `tracing::error!` and the current request id; the
    /// response says only `internal error` and carries `details.request_id`.
    pub fn internal(error: impl fmt::Display) -> Self {
        let request_id = RequestId::current();
        let request_id_text = request_id.as_ref().map(RequestId::as_str);
        tracing::error!(request_id = request_id_text, error = %error, "internal error");
        let api_error = Self::new(ErrorCode::Internal, "internal error");
        match request_id {
            Some(id) => api_error.with_detail("request_id", id.as_str()),
            None => api_error,
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// The JSON body of this error.
    pub fn body(&self) -> ApiErrorBody {
        ApiErrorBody {
            code: self.code,
            message: self.message.clone(),
            details: self.details.clone(),
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let code = self.code;
        let retry_after = self.retry_after_secs;
        let body = ApiErrorBody {
            code: self.code,
            message: self.message,
            details: self.details,
        };
        let mut response = json_response(status, &body);
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        // The request log line reads the code from here.
        response.extensions_mut().insert(code);
        response
    }
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            bytes,
        )
            .into_response(),
        // Serializing a struct of strings and JSON values cannot fail; answer something
        // valid all the same.
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            r#"{"code":"internal","message":"internal error","details":{}}"#,
        )
            .into_response(),
    }
}

/// A JSON request body (and response body). Rejections: 415 without a JSON content type,
/// 413 over the body limit, 400 for malformed JSON (with `details.line` and
/// `details.column`), 422 when the JSON does not fit `T` (with `details.path` too).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !has_json_content_type(request.headers()) {
            return Err(ApiError::unsupported_media_type("application/json"));
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(body_rejection)?;
        parse_json(&bytes).map(ApiJson)
    }
}

impl<T: Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(bytes) => (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                bytes,
            )
                .into_response(),
            Err(error) => {
                ApiError::internal(format!("serializing a response: {error}")).into_response()
            }
        }
    }
}

/// `application/json` or any `application/*+json`, parameters ignored.
fn has_json_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(arches_tools::media_type::is_json)
}

fn body_rejection(rejection: BytesRejection) -> ApiError {
    match rejection {
        BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => {
            ApiError::payload_too_large(None)
        }
        _ => ApiError::bad_request("failed to read the request body"),
    }
}

/// Parses `bytes` as one JSON value of type `T`, mapping errors as [`ApiJson`] documents.
///
/// # Errors
///
/// 400 `bad_request` for malformed JSON, 422 `validation_failed` for a shape mismatch.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        json_error(error.into_inner(), Some(path))
    })?;
    deserializer
        .end()
        .map_err(|error| json_error(error, None))?;
    Ok(value)
}

fn json_error(error: serde_json::Error, path: Option<String>) -> ApiError {
    let position = json!({"line": error.line(), "column": error.column()});
    let api_error = match error.classify() {
        serde_json::error::Category::Data => ApiError::new(
            ErrorCode::ValidationFailed,
            format!("invalid request body: {error}"),
        ),
        serde_json::error::Category::Syntax
        | serde_json::error::Category::Eof
        | serde_json::error::Category::Io => {
            ApiError::bad_request(format!("malformed JSON in request body: {error}"))
        }
    }
    .with_details(position);
    match path.filter(|path| path != ".") {
        Some(path) => api_error.with_detail("path", path),
        None => api_error,
    }
}

/// Path parameters. Rejections: 400 `bad_request` naming the parameter when a value does
/// not parse; 500 when the route and the type disagree (a bug).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(path_rejection(rejection)),
        }
    }
}

fn path_rejection(rejection: PathRejection) -> ApiError {
    use axum::extract::path::ErrorKind;

    let PathRejection::FailedToDeserializePathParams(error) = rejection else {
        return ApiError::internal(format!("path parameters: {}", rejection.body_text()));
    };
    if error.status().is_server_error() {
        return ApiError::internal(format!("path parameters: {}", error.body_text()));
    }
    let parameter = match error.kind() {
        ErrorKind::ParseErrorAtKey { key, .. }
        | ErrorKind::InvalidUtf8InPathParam { key }
        | ErrorKind::DeserializeError { key, .. } => Some(Value::from(key.clone())),
        ErrorKind::ParseErrorAtIndex { index, .. } => Some(Value::from(*index)),
        _ => None,
    };
    let api_error = ApiError::bad_request(format!("invalid path parameter: {}", error.kind()));
    match parameter {
        Some(parameter) => api_error.with_detail("parameter", parameter),
        None => api_error,
    }
}

/// A query string. Rejection: 400 `bad_request` with the serde message and
/// `details.parameter` naming the parameter when known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parse_query(parts.uri.query().unwrap_or_default()).map(ApiQuery)
    }
}

/// Parses a URL query string (without the `?`) into `T`.
///
/// # Errors
///
/// 400 `bad_request` naming the parameter that failed.
pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let deserializer =
        serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let api_error = ApiError::bad_request(format!("invalid query string: {}", error.inner()));
        if path == "." {
            api_error
        } else {
            api_error.with_detail("parameter", path)
        }
    })
}

/// The fallback handler: 404 `not_found` naming the method and path.
pub async fn fallback(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no route for {method} {}", uri.path()),
    )
    .with_detail("method", method.as_str())
    .with_detail("path", uri.path())
}

/// The method-not-allowed handler: 405 `method_not_allowed` (axum adds the `Allow` header).
pub async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::method_not_allowed(&method)
}

/// Installs [`fallback`] and [`method_not_allowed`] on `router`. Call it after every route
/// is added: axum applies the method fallback to the routes present at that moment.
pub fn with_api_fallbacks<S>(router: Router<S>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router
        .fallback(fallback)
        .method_not_allowed_fallback(method_not_allowed)
}

/// The longest error body from a library that is read to become a message, in bytes.
const FOREIGN_ERROR_BODY_MAX_BYTES: usize = 1024;

/// Middleware: rewrites an error response (4xx/5xx) whose body is not JSON, such as a
/// rejection from an axum extractor or a `tower-http` layer, into [`ApiErrorBody`]. The
/// status and other headers are kept. A 4xx keeps its short text as the message; a 5xx
/// never shows its text (it is logged) and carries `details.request_id`.
pub async fn normalize_error_bodies(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error())
        || is_json_response(response.headers())
    {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, FOREIGN_ERROR_BODY_MAX_BYTES).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Err(_) => String::new(),
    };
    let code = ErrorCode::from_status(status);
    let mut error = if status.is_server_error() {
        let mut error = ApiError::internal(format!(
            "{status} from a layer: {}",
            if text.is_empty() { "(no body)" } else { &text }
        ));
        error.code = code;
        error
    } else if text.is_empty() {
        ApiError::new(
            code,
            status
                .canonical_reason()
                .unwrap_or("request failed")
                .to_ascii_lowercase(),
        )
    } else {
        ApiError::new(code, text)
    };
    if let Some(secs) = parts
        .headers
        .get(header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
    {
        error = error.with_retry_after(secs);
    }
    let rendered = error.into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::TRANSFER_ENCODING);
    for (name, value) in rendered.headers() {
        parts.headers.insert(name.clone(), value.clone());
    }
    let (rendered_parts, body) = rendered.into_parts();
    parts.extensions.extend(rendered_parts.extensions);
    // The original status stays (a 408 stays a 408 even though its code is bad_request).
    Response::from_parts(parts, Body::new(body))
}

fn is_json_response(headers: &HeaderMap) -> bool {
    has_json_content_type(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use serde::Deserialize;
    use tower::ServiceExt;

    async fn send(router: Router, request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
        let response = router.oneshot(request).await.expect("infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, headers, body)
    }

    fn post_json(uri: &str, content_type: Option<&str>, body: &str) -> Request<Body> {
        let mut builder = Request::builder().method("POST").uri(uri);
        if let Some(content_type) = content_type {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        builder.body(Body::from(body.to_owned())).expect("request")
    }

    #[derive(Debug, Deserialize, Serialize)]
    struct NewPipeline {
        name: String,
        tasks: Vec<Task>,
    }

    #[derive(Debug, Deserialize, Serialize)]
    struct Task {
        retries: u32,
    }

    fn json_router() -> Router {
        Router::new().route(
            "/pipelines",
            post(|ApiJson(body): ApiJson<NewPipeline>| async move { ApiJson(body) }),
        )
    }

    #[test]
    fn every_code_has_a_stable_wire_name_and_status() {
        let expected = [
            ("bad_request", 400),
            ("validation_failed", 422),
            ("unauthenticated", 401),
            ("invalid_credentials", 401),
            ("token_expired", 401),
            ("mfa_required", 401),
            ("forbidden", 403),
            ("not_found", 404),
            ("method_not_allowed", 405),
            ("conflict", 409),
            ("gone", 410),
            ("payload_too_large", 413),
            ("unsupported_media_type", 415),
            ("range_not_satisfiable", 416),
            ("rate_limited", 429),
            ("unavailable", 503),
            ("internal", 500),
        ];
        let actual: Vec<(&str, u16)> = ErrorCode::ALL
            .iter()
            .map(|code| (code.as_str(), code.status().as_u16()))
            .collect();
        assert_eq!(actual, expected);
        for code in ErrorCode::ALL {
            assert_eq!(
                serde_json::to_value(code).expect("serializable"),
                Value::from(code.as_str())
            );
        }
    }

    #[tokio::test]
    async fn an_api_error_renders_the_one_shape_with_its_status_and_retry_after() {
        let response = ApiError::rate_limited(7).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        let body: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(
            body,
            json!({"code": "rate_limited", "message": "too many requests", "details": {"retry_after_secs": 7}})
        );
    }

    #[test]
    fn constructors_fill_the_details() {
        let error = ApiError::not_found("run", "r1");
        assert_eq!(error.status(), StatusCode::NOT_FOUND);
        assert_eq!(error.message, "run r1 not found");
        assert_eq!(error.details, json!({"kind": "run", "id": "r1"}));
        let error = ApiError::forbidden("runs:write");
        assert_eq!(error.details, json!({"permission": "runs:write"}));
        let error = ApiError::validation(json!({"fields": {"name": "must not be empty"}}));
        assert_eq!(error.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            ApiError::conflict("name taken").status(),
            StatusCode::CONFLICT
        );
    }

    #[tokio::test]
    async fn an_internal_error_hides_its_cause_and_shows_the_request_id() {
        let request_id = RequestId::parse("req-42").expect("valid id");
        let error = request_id
            .scope(async { ApiError::internal("database password is hunter2") })
            .await;
        let body = error.body();
        assert_eq!(body.code, ErrorCode::Internal);
        assert_eq!(body.message, "internal error");
        assert_eq!(body.details, json!({"request_id": "req-42"}));
        assert!(!format!("{body:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn valid_json_reaches_the_handler() {
        let (status, _, body) = send(
            json_router(),
            post_json(
                "/pipelines",
                Some("application/json; charset=utf-8"),
                r#"{"name": "daily", "tasks": [{"retries": 2}]}"#,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["name"], "daily");
    }

    #[tokio::test]
    async fn json_without_a_json_content_type_is_415() {
        let (status, _, body) = send(
            json_router(),
            post_json("/pipelines", Some("text/plain"), "{}"),
        )
        .await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(body["code"], "unsupported_media_type");
        let (status, _, _) = send(json_router(), post_json("/pipelines", None, "{}")).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[tokio::test]
    async fn malformed_json_is_400_with_line_and_column() {
        let (status, _, body) = send(
            json_router(),
            post_json(
                "/pipelines",
                Some("application/json"),
                "{\n  \"name\": \"x\",\n  oops\n}",
            ),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["code"], "bad_request");
        assert_eq!(body["details"]["line"], 3);
        assert_eq!(body["details"]["column"], 3);
        assert!(body["message"]
            .as_str()
            .expect("message")
            .starts_with("malformed JSON"));

        let (status, _, body) = send(
            json_router(),
            post_json(
                "/pipelines",
                Some("application/json"),
                r#"{"name": "x", "tasks": []} trailing"#,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }

    #[tokio::test]
    async fn json_of_the_wrong_shape_is_422_with_the_path() {
        let (status, _, body) = send(
            json_router(),
            post_json(
                "/pipelines",
                Some("application/json"),
                r#"{"name": "x", "tasks": [{"retries": -1}]}"#,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["code"], "validation_failed");
        assert_eq!(body["details"]["path"], "tasks[0].retries");
        assert_eq!(body["details"]["line"], 1);
        assert!(body["details"]["column"].as_u64().expect("column") > 0);
    }

    #[tokio::test]
    async fn a_body_over_the_extractor_limit_is_413() {
        let router = json_router().layer(axum::extract::DefaultBodyLimit::max(8));
        let (status, _, body) = send(
            router,
            post_json(
                "/pipelines",
                Some("application/json"),
                r#"{"name": "a long name", "tasks": []}"#,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["code"], "payload_too_large");
    }

    #[derive(Debug, Deserialize)]
    struct Page {
        limit: u32,
        #[serde(default)]
        #[allow(dead_code)]
        cursor: Option<String>,
    }

    #[tokio::test]
    async fn a_bad_query_parameter_is_400_naming_the_parameter() {
        let router = Router::new().route(
            "/runs",
            get(|ApiQuery(page): ApiQuery<Page>| async move { page.limit.to_string() }),
        );
        let get_uri = |uri: &str| Request::get(uri).body(Body::empty()).expect("request");
        let (status, _, body) = send(router.clone(), get_uri("/runs?limit=10")).await;
        assert_eq!((status, body), (StatusCode::OK, Value::from(10)));

        let (status, _, body) = send(router.clone(), get_uri("/runs?limit=ten")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["code"], "bad_request");
        assert_eq!(body["details"]["parameter"], "limit");

        let (status, _, body) = send(router, get_uri("/runs")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["message"].as_str().expect("message").contains("limit"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn a_bad_path_parameter_is_400_naming_the_parameter() {
        #[derive(Deserialize)]
        struct RunPath {
            number: u64,
        }
        let router = Router::new().route(
            "/runs/{number}",
            get(|ApiPath(path): ApiPath<RunPath>| async move { path.number.to_string() }),
        );
        let (status, _, body) = send(
            router.clone(),
            Request::get("/runs/12")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
        assert_eq!((status, body), (StatusCode::OK, Value::from(12)));
        let (status, _, body) = send(
            router,
            Request::get("/runs/twelve")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["details"]["parameter"], "number");
    }

    #[tokio::test]
    async fn a_path_type_that_disagrees_with_the_route_is_a_500_without_internals() {
        let router = Router::new().route(
            "/runs/{id}",
            get(|ApiPath(pair): ApiPath<(String, String)>| async move { pair.0 }),
        );
        let (status, _, body) = send(
            router,
            Request::get("/runs/1")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["message"], "internal error");
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_get_json_404_and_405() {
        let router = with_api_fallbacks(Router::new().route("/runs", get(|| async { "ok" })));
        let (status, _, body) = send(
            router.clone(),
            Request::get("/nope").body(Body::empty()).expect("request"),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["code"], "not_found");
        assert_eq!(body["details"]["path"], "/nope");

        let (status, headers, body) = send(
            router,
            Request::delete("/runs")
                .body(Body::empty())
                .expect("request"),
        )
        .await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(body["code"], "method_not_allowed");
        assert_eq!(headers[header::ALLOW], "GET,HEAD");
    }

    #[tokio::test]
    async fn plain_error_responses_from_libraries_are_rewritten_into_the_shape() {
        let router = Router::new()
            .route(
                "/plain",
                get(|| async {
                    (
                        StatusCode::CONFLICT,
                        [(header::RETRY_AFTER, "3")],
                        "already running",
                    )
                }),
            )
            .route(
                "/boom",
                get(|| async {
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "stack trace with secrets",
                    )
                }),
            )
            .route(
                "/axum-json",
                post(|axum::Json(body): axum::Json<Task>| async move { body.retries.to_string() }),
            )
            .layer(axum::middleware::from_fn(normalize_error_bodies));

        let (status, headers, body) = send(
            router.clone(),
            Request::get("/plain").body(Body::empty()).expect("request"),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(headers[header::RETRY_AFTER], "3");
        assert_eq!(
            body,
            json!({"code": "conflict", "message": "already running", "details": {}})
        );

        let (status, _, body) = send(
            router.clone(),
            Request::get("/boom").body(Body::empty()).expect("request"),
        )
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["message"], "internal error");
        assert!(!body.to_string().contains("secrets"));

        let (status, _, body) = send(
            router,
            post_json("/axum-json", Some("application/json"), "{}"),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(body["code"], "validation_failed");
    }
}

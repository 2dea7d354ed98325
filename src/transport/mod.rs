//! Transports: how clients reach the hub and the schema.

pub mod envelope_types;
pub mod http;
pub mod ws;

use actix_web::web;

pub fn configure(cfg: &mut web::ServiceConfig) {
    // First: the upgrade on /graphql must be matched before the plain GET.
    ws::configure(cfg);
    http::configure(cfg);
}

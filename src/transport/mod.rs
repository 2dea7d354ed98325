//! Transports: how clients reach the hub and the schema.

pub mod http;

use actix_web::web;

pub fn configure(cfg: &mut web::ServiceConfig) {
    http::configure(cfg);
}

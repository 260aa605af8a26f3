//! The jobs reconciler against a mock API server.

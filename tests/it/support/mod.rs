//! What the tests share: projects driven through the `farm` binary, guests, fixtures and the
//! real servers (nginx, sshd, an OCI registry, moto's S3, libvirtd) they start on 127.0.0.1.

pub mod cloud_image;
pub mod entries;
pub mod fixture;
pub mod guest;
pub mod hello_deb;
pub mod http_server;
pub mod lab;
pub mod labs;
pub mod libvirtd;
pub mod moto;
pub mod mount_ns;
pub mod nginx;
pub mod project;
pub mod registry;
pub mod skip;
pub mod sshd;
pub mod test_home;

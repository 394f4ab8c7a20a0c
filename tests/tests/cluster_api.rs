//! The OCI Distribution API tests of `shared/api_cases.rs`, run against a frontend of a 3/3/2
//! cluster of processes instead of `berth standalone`: each test its own cluster.

use berth_tests::cluster::ClusterTarget as Target;

include!("shared/api_cases.rs");

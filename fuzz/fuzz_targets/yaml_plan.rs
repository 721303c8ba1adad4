//! One more YAML file beside the example cluster: loading and planning never panic, and the
//! file never changes the table of a Service it does not touch.
#![no_main]

use topoproxy::fuzzing::{plan_with_extra_object, Baseline};

/// examples/cluster (the golden tests' input), all in one file.
const CLUSTER: &str = concat!(
    include_str!("../../examples/cluster/nodes.yaml"),
    "\n---\n",
    include_str!("../../examples/cluster/kube-system.yaml"),
    "\n---\n",
    include_str!("../../examples/cluster/shop/cart.yaml"),
    "\n---\n",
    include_str!("../../examples/cluster/shop/catalog.yaml"),
    "\n---\n",
    include_str!("../../examples/cluster/shop/checkout.yaml"),
    "\n---\n",
    include_str!("../../examples/cluster/shop/frontend.yaml"),
    "\n---\n",
    include_str!("../../examples/cluster/shop/not-proxied.yaml"),
);

libfuzzer_sys::fuzz_target!(|extra: &[u8]| {
    let baseline = Baseline {
        yaml: CLUSTER,
        node: "node-b1",
    };
    if let Err(broken) = plan_with_extra_object(&baseline, extra) {
        panic!("a broken object changed another Service's table: {broken}");
    }
});

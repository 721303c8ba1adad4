// CoreDNS with only the plugins the real-node tests use, built as CoreDNS's own main is
// (coremain.Run) from the github.com/coredns/coredns module: kubernetes answers the
// cluster.local zone from the API, chaos answers `CH TXT hostname.bind` with the pod's
// hostname (its name) so a test knows which replica answered, log writes each query to the
// pod's log, errors, health and ready give the probes. Its own module, so the Kubernetes
// modules CoreDNS needs do not move the versions tests/k8s/go.mod pins for the control plane.
package main

import (
	"fmt"
	"os"

	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/chaos"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The plugins in the order CoreDNS's plugin.cfg runs them.
var directives = []string{
	"ready",
	"health",
	"errors",
	"log",
	"chaos",
	"kubernetes",
}

func main() {
	if err := dnsserver.SetDirectives(directives); err != nil {
		fmt.Fprintln(os.Stderr, "directives:", err)
		os.Exit(1)
	}
	coremain.Run()
}

package config

import (
	"regexp"
	"strings"
	"testing"
)

// DumpFor shows what is true of the process: an address it does not
// listen on says so.
func TestDumpForProcess(t *testing.T) {
	c := mustParse(t, minimal+"listen: 127.0.0.1:9000\nworker_listen: 127.0.0.1:9001\n", env())
	for _, tc := range []struct {
		name                 string
		p                    Process
		listen, workerListen string
	}{
		{"serve and dev", Process{API: true, Worker: true}, `127\.0\.0\.1:9000 \(the api, and the worker's health and metrics\)`, `not used: the worker runs in the api's process and is served on listen`},
		{"api", Process{API: true}, `127\.0\.0\.1:9000`, `not used: no worker in this process`},
		{"worker", Process{Worker: true}, `not used: no api in this process`, `127\.0\.0\.1:9001 \(the worker's /healthz, /readyz and /metrics\)`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var b strings.Builder
			c.DumpFor(&b, tc.p)
			out := b.String()
			if !regexp.MustCompile(`(?m)^  listen +`+tc.listen+`$`).MatchString(out) ||
				!regexp.MustCompile(`(?m)^  worker_listen +`+tc.workerListen+`$`).MatchString(out) {
				t.Fatalf("DumpFor(%+v):\n%s", tc.p, out)
			}
		})
	}
	var b strings.Builder
	c.Dump(&b)
	if !strings.Contains(b.String(), "  worker_listen                127.0.0.1:9001\n") {
		t.Fatalf("Dump shows the configured addresses:\n%s", b.String())
	}
}

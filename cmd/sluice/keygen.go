package main

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/sluice-dev/sluice/config"
)

const keygenHelp = `Usage: sluice keygen [flags]

Prints a new random key (32 bytes from the system's secure random source,
base64url) and its sha256 form. Give the plain key to the client (a tenant's
app, or the operator for an admin key) and write the sha256 form in the
configuration file, which then holds no usable secret:

  tenants:
    - name: acme
      keys: ["sha256:…"]
  admin_keys: ["sha256:…"]

An admin key may instead be given plain in the environment: SLUICE_ADMIN_KEY.

Flags:
  --prefix TEXT   the key's prefix, to recognise it in a leak (default sk-sluice-)
`

// keyPrefix starts every key that keygen makes.
const keyPrefix = "sk-sluice-"

// runKeygen runs `sluice keygen`.
func runKeygen(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("keygen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, keygenHelp) }
	prefix := fs.String("prefix", keyPrefix, "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("keygen takes no arguments, got %q", fs.Args())
	}
	key, err := newKey(*prefix)
	if err != nil {
		return err
	}
	if _, err := config.ParseKey(key); err != nil {
		return fmt.Errorf("--prefix: %w", err)
	}
	fmt.Fprintf(stdout, "key:     %s\nsha256:  %s\n", key, config.HashKey(key))
	fmt.Fprintln(stderr, "Give the key to its user; write the sha256 form in the config file (tenants[].keys or admin_keys),\nor put the plain admin key in SLUICE_ADMIN_KEY. The key is not shown again.")
	return nil
}

// newKey is prefix followed by 32 random bytes in unpadded base64url.
func newKey(prefix string) (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("random source: %w", err)
	}
	return prefix + base64.RawURLEncoding.EncodeToString(b), nil
}

// refusePublishedKeys fails when cfg holds a key published in
// sluice.example.yaml and addr (the api's listen address) is reachable from
// other machines. Loopback addresses (127.0.0.0/8, ::1, localhost) are
// allowed, so the example file still works for a try on one's own machine.
func refusePublishedKeys(cfg *config.Config, addr string) error {
	paths := cfg.PublishedKeys()
	if len(paths) == 0 || loopbackOnly(addr) {
		return nil
	}
	return fmt.Errorf(`refusing to serve on %s: the configuration holds keys published in sluice.example.yaml, at %s.
Anyone who has read the sluice repository knows these keys: they could submit jobs that spend your Anthropic API key (and, with an admin key, read every tenant's jobs and usage).
Fix: run "sluice keygen" once for each key above, and write the sha256:… form it prints in place of that key in your config file (an admin key may instead be given plain in the environment as SLUICE_ADMIN_KEY, and removed from the file; SLUICE_ADMIN_KEY, if set, is the last of admin_keys).
To just try the example configuration, listen on this machine only: --listen 127.0.0.1:8080`,
		addr, strings.Join(paths, ", "))
}

// loopbackOnly reports whether addr (host:port) listens on a loopback
// address only. An empty host (":8080") means every interface.
func loopbackOnly(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

const healthcheckHelp = `Usage: sluice healthcheck [flags]

GETs a URL and exits 0 if it answers 200, else 1: a health check for
containers without curl or wget (the sluice image is distroless), e.g. in
docker-compose.yml:

  healthcheck:
    test: ["CMD", "/usr/local/bin/sluice", "healthcheck", "--url", "http://127.0.0.1:8080/readyz"]

Flags:
  --url URL           what to GET (default http://127.0.0.1:8080/readyz; a
                      worker's is http://127.0.0.1:8081/readyz)
  --timeout DURATION  give up after this long (default 5s)
`

// runHealthcheck runs `sluice healthcheck`.
func runHealthcheck(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("healthcheck", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, healthcheckHelp) }
	url := fs.String("url", "http://127.0.0.1:8080/readyz", "")
	timeout := fs.Duration("timeout", 5*time.Second, "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, *url, nil)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck: %s answered %s: %s", *url, resp.Status, strings.TrimSpace(string(body)))
	}
	fmt.Fprintf(stdout, "%s: %s\n", *url, strings.TrimSpace(string(body)))
	return nil
}

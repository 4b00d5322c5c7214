package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"

	"github.com/sluice-dev/sluice/config"
	"github.com/sluice-dev/sluice/internal/redistest"
)

var keygenRE = regexp.MustCompile(`^key:\s+(sk-sluice-[A-Za-z0-9_-]{43})\nsha256:\s+(sha256:[0-9a-f]{64})\n$`)

func TestKeygen(t *testing.T) {
	seen := map[string]bool{}
	for range 3 {
		var stdout, stderr bytes.Buffer
		if err := run(context.Background(), []string{"keygen"}, func(string) string { return "" }, &stdout, &stderr); err != nil {
			t.Fatalf("keygen: %v\n%s", err, stderr.String())
		}
		m := keygenRE.FindStringSubmatch(stdout.String())
		if m == nil {
			t.Fatalf("keygen printed %q, want key: sk-sluice-<43 base64url> and sha256: sha256:<64 hex>", stdout.String())
		}
		key, hashed := m[1], m[2]
		raw, err := base64.RawURLEncoding.DecodeString(strings.TrimPrefix(key, keyPrefix))
		if err != nil || len(raw) != 32 {
			t.Fatalf("key %q is not 32 bytes of base64url: %v", key, err)
		}
		d := sha256.Sum256([]byte(key))
		if hashed != "sha256:"+hex.EncodeToString(d[:]) {
			t.Fatalf("sha256 form %s is not the key's digest", hashed)
		}
		// Both forms are accepted by the config, and are the same key.
		plainKey, err := config.ParseKey(key)
		if err != nil {
			t.Fatal(err)
		}
		hashedKey, err := config.ParseKey(hashed)
		if err != nil {
			t.Fatal(err)
		}
		if !plainKey.Equal(hashedKey) || !hashedKey.Matches(key) || hashedKey.IsPublished() {
			t.Fatal("the sha256 form does not match the key, or the key counts as published")
		}
		if seen[key] {
			t.Fatal("keygen printed the same key twice")
		}
		seen[key] = true
	}

	var stderr bytes.Buffer
	err := run(context.Background(), []string{"keygen", "--prefix", "acme-"}, func(string) string { return "" }, &bytes.Buffer{}, &stderr)
	if err != nil {
		t.Fatalf("keygen --prefix: %v", err)
	}
	if err := run(context.Background(), []string{"keygen", "--prefix", "has space "}, func(string) string { return "" }, &bytes.Buffer{}, &bytes.Buffer{}); err == nil {
		t.Error("keygen with a prefix a header cannot carry must fail")
	}
}

func TestHealthcheck(t *testing.T) {
	status := http.StatusOK
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(status)
		_, _ = w.Write([]byte(`{"status":"x"}`))
	}))
	defer srv.Close()
	hc := func(url string) error {
		return run(context.Background(), []string{"healthcheck", "--url", url, "--timeout", "2s"}, func(string) string { return "" }, &bytes.Buffer{}, &bytes.Buffer{})
	}
	if err := hc(srv.URL + "/readyz"); err != nil {
		t.Errorf("200: %v", err)
	}
	status = http.StatusServiceUnavailable
	if err := hc(srv.URL + "/readyz"); err == nil || !strings.Contains(err.Error(), "503") {
		t.Errorf("503: err = %v, want a failure naming the status", err)
	}
	if err := hc("http://127.0.0.1:1/readyz"); err == nil {
		t.Error("nothing listening: want a failure")
	}
}

func TestLoopbackOnly(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:8080": true, "127.0.0.1:0": true, "127.1.2.3:80": true, "[::1]:8080": true, "localhost:8080": true, "LOCALHOST:1": true,
		":8080": false, "0.0.0.0:8080": false, "[::]:8080": false, "10.0.0.5:8080": false, "example.com:80": false, "nonsense": false,
	} {
		if got := loopbackOnly(addr); got != want {
			t.Errorf("loopbackOnly(%q) = %t, want %t", addr, got, want)
		}
	}
}

// TestPublishedKeysRefused: the example file's keys are public, so an api
// reachable from other machines refuses them, naming each key's path, why,
// and how to fix it; on loopback the example file still starts.
func TestPublishedKeysRefused(t *testing.T) {
	// Redis is unreachable: the refusal must come before connecting to it.
	env := map[string]string{"REDIS_URL": "redis://127.0.0.1:1/0"}
	for _, args := range [][]string{
		{"api", "--config", "../../sluice.example.yaml", "--listen", "0.0.0.0:0"},
		{"serve", "--config", "../../sluice.example.yaml", "--listen", ":0"},
	} {
		var stderr bytes.Buffer
		err := run(context.Background(), args, func(k string) string { return env[k] }, &bytes.Buffer{}, &stderr)
		if err == nil {
			t.Fatalf("%v: started with the published example keys", args)
		}
		msg := err.Error()
		for _, want := range []string{"admin_keys[0]", "tenants[0].keys[0]", "tenants[1].keys[0]", "sluice.example.yaml",
			"Anthropic API key", "sluice keygen", "sha256:", "SLUICE_ADMIN_KEY", "--listen 127.0.0.1"} {
			if !strings.Contains(msg, want) {
				t.Errorf("%v: the refusal does not say %q:\n%s", args, want, msg)
			}
		}
		if strings.Contains(msg, "Redis") {
			t.Errorf("%v: the refusal is about Redis, not the keys:\n%s", args, msg)
		}
		if strings.Contains(msg, "example-classroom-key-0001") {
			t.Errorf("%v: the refusal repeats a key", args)
		}
	}

	// A key from SLUICE_ADMIN_KEY is checked too.
	path := writeConfig(t, "redis://127.0.0.1:1/0", "http://127.0.0.1:1")
	env["SLUICE_ADMIN_KEY"] = "example-admin-key-0003"
	err := run(context.Background(), []string{"api", "--config", path, "--listen", "0.0.0.0:0"}, func(k string) string { return env[k] }, &bytes.Buffer{}, &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), "admin_keys[") {
		t.Fatalf("published SLUICE_ADMIN_KEY: err = %v", err)
	}

	// Loopback only: the example file starts.
	r := redistest.Start(t)
	loopEnv := map[string]string{"REDIS_URL": r.URL}
	base, _, stop := startRun(t, []string{"api", "--config", "../../sluice.example.yaml", "--listen", "127.0.0.1:0"}, func(k string) string { return loopEnv[k] })
	resp, err := http.Get(base + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("/readyz = %d", resp.StatusCode)
	}
	if err := stop(); err != nil {
		t.Fatal(err)
	}
}

// TestHelpListsKeygenAndHealthcheck: `sluice help` lists the new commands
// (their --help is checked in TestHelpOfEveryCommand).
func TestHelpListsKeygenAndHealthcheck(t *testing.T) {
	var stdout bytes.Buffer
	if err := run(context.Background(), []string{"help"}, func(string) string { return "" }, &stdout, &bytes.Buffer{}); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range []string{"keygen", "healthcheck"} {
		if !strings.Contains(stdout.String(), "  "+cmd+" ") {
			t.Errorf("sluice help does not list %s", cmd)
		}
	}
}

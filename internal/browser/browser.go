// Package browser starts headless Chromium for tests that drive sluice's
// pages. It looks for Debian's chromium (or $SLUICE_CHROMIUM); without one
// the test is skipped, unless SLUICE_REQUIRE_BROWSER=1 (set by .ci/run),
// where it fails.
package browser

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// Find returns the Chromium executable, or "".
func Find() string {
	if p := os.Getenv("SLUICE_CHROMIUM"); p != "" {
		return p
	}
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// New starts a headless Chromium for the test and returns a context to run
// chromedp actions in; everything stops when the test ends. within bounds
// the whole browser session.
func New(t *testing.T, within time.Duration) context.Context {
	t.Helper()
	exe := Find()
	if exe == "" {
		if os.Getenv("SLUICE_REQUIRE_BROWSER") == "1" {
			t.Fatal("no Chromium found (install Debian's chromium, or set SLUICE_CHROMIUM)")
		}
		t.Skip("no Chromium found: install Debian's chromium (apt-get install chromium) to run the browser tests")
	}
	// The flags keep Chromium off the network (this machine kind has none
	// beyond loopback) and away from any profile of the user's.
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(exe),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.WindowSize(1100, 900),
	)
	ctx, cancel := context.WithTimeout(context.Background(), within)
	actx, cancelAlloc := chromedp.NewExecAllocator(ctx, opts...)
	copts := []chromedp.ContextOption{chromedp.WithErrorf(t.Logf)}
	if os.Getenv("SLUICE_BROWSER_DEBUG") == "1" {
		copts = append(copts, chromedp.WithDebugf(t.Logf)) // every DevTools message
	}
	bctx, cancelBrowser := chromedp.NewContext(actx, copts...)
	t.Cleanup(func() {
		cancelBrowser()
		cancelAlloc()
		cancel()
	})
	if err := chromedp.Do(bctx); err != nil {
		t.Fatalf("start chromium %s: %v", exe, err)
	}
	return bctx
}

// ArtifactPath is where a test saves a file for people to look at (a
// screenshot): $SLUICE_ARTIFACTS, or test-artifacts/ at the repository root.
func ArtifactPath(t *testing.T, name string) string {
	t.Helper()
	dir := os.Getenv("SLUICE_ARTIFACTS")
	if dir == "" {
		_, file, _, _ := runtime.Caller(0)
		dir = filepath.Join(filepath.Dir(file), "..", "..", "test-artifacts")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(dir, name)
}

package api_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/sluice-dev/sluice/internal/harness"
)

// A client that trickles its body is cut off after api.body_timeout with a
// 408; an event stream (no body) lives on far longer than that.
func TestBodyTimeoutCutsSlowBodiesNotStreams(t *testing.T) {
	e := harness.Start(t, harness.Options{NoWorker: true, APIExtra: "  body_timeout: 1s\n"})
	addr := strings.TrimPrefix(e.API.URL, "http://")

	t.Run("slow body", func(t *testing.T) {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		body := `{"user_id":"alice","request":{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"hi"}]}}`
		fmt.Fprintf(conn, "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nx-api-key: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n", harness.TenantKey, len(body))
		// One byte every 200 ms: the whole body would take ~20 s.
		stop := make(chan struct{})
		defer close(stop)
		go func() {
			for i := 0; i < len(body); i++ {
				select {
				case <-stop:
					return
				case <-time.After(200 * time.Millisecond):
				}
				if _, err := conn.Write([]byte{body[i]}); err != nil {
					return
				}
			}
		}()
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("no answer within 5 s to a body trickled past a 1 s body timeout: %v", err)
		}
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusRequestTimeout || !strings.Contains(string(b), "did not arrive within 1s") {
			t.Fatalf("answer %d %s; want 408 naming the timeout", resp.StatusCode, b)
		}
		if n, _ := e.Sched.QueueLength(context.Background(), "sonnet"); n != 0 {
			t.Fatalf("%d jobs queued from a body that never arrived", n)
		}
	})

	t.Run("event stream", func(t *testing.T) {
		v := e.Submit(t, harness.JobBody("alice", "wait for me"))
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		fmt.Fprintf(conn, "GET /v1/jobs/%s/events?token=%s HTTP/1.1\r\nHost: x\r\n\r\n", v.ID, v.Token)
		br := bufio.NewReader(conn)
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("events: %v %v", resp, err)
		}
		// Read the stream for 4 body timeouts: it must neither end nor fail
		// until our own deadline does.
		_ = conn.SetReadDeadline(time.Now().Add(4 * time.Second))
		_, err = io.Copy(io.Discard, resp.Body)
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("the event stream ended after less than 4 s with a 1 s body timeout: %v", err)
		}
	})
}

package harness

import (
	"bufio"
	"io"
	"strings"
	"testing"
)

// SSEEvent is one parsed Server-Sent Event.
type SSEEvent struct {
	ID, Event, Data string
}

// ReadSSE parses events from r until a terminal event, EOF, or max events
// (max < 0: no limit).
func ReadSSE(tb testing.TB, r io.Reader, max int) []SSEEvent {
	tb.Helper()
	var out []SSEEvent
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<24)
	var cur SSEEvent
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if cur.Event != "" || cur.Data != "" {
				out = append(out, cur)
				if terminal(cur.Event) || (max >= 0 && len(out) >= max) {
					return out
				}
			}
			cur = SSEEvent{}
		case strings.HasPrefix(line, ":"):
		case strings.HasPrefix(line, "id: "):
			cur.ID = line[4:]
		case strings.HasPrefix(line, "event: "):
			cur.Event = line[7:]
		case strings.HasPrefix(line, "data: "):
			cur.Data += line[6:]
		}
	}
	return out
}

func terminal(ev string) bool {
	switch ev {
	case "succeeded", "failed", "canceled", "expired":
		return true
	}
	return false
}

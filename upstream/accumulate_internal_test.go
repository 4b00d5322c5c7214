package upstream

import (
	"encoding/json"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestAccumulatorKeepsEveryDeltaField: every field of message_delta's
// delta is the Message's at its top level, as sent; a null names a field
// not yet there but never undoes a value.
func TestAccumulatorKeepsEveryDeltaField(t *testing.T) {
	a := newAccumulator()
	for _, ev := range []struct{ typ, raw string }{
		{"message_start", `{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":5,"output_tokens":1}}}`},
		{"content_block_start", `{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}`},
		{"content_block_delta", `{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"no"}}`},
		{"content_block_stop", `{"type":"content_block_stop","index":0}`},
		{"message_delta", `{"type":"message_delta","delta":{"stop_reason":"refusal","stop_sequence":null,` +
			`"stop_details":{"type":"refusal","category":"cyber","explanation":null},"container":null,` +
			`"context_management":{"applied_edits":[]},"content":"ignored"},"usage":{"output_tokens":2}}`},
		{"message_delta", `{"type":"message_delta","delta":{"stop_reason":null,"stop_details":null},"usage":{"output_tokens":2}}`},
		{"message_stop", `{"type":"message_stop"}`},
	} {
		if err := a.add(ev.typ, []byte(ev.raw)); err != nil {
			t.Fatalf("%s: %v", ev.typ, err)
		}
	}
	raw, _, _, err := a.result()
	if err != nil {
		t.Fatal(err)
	}
	var got, want any
	_ = json.Unmarshal(raw, &got)
	_ = json.Unmarshal([]byte(`{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[{"type":"text","text":"no"}],
		"stop_reason":"refusal","stop_sequence":null,"stop_details":{"type":"refusal","category":"cyber","explanation":null},
		"usage":{"input_tokens":5,"output_tokens":2},"container":null,"context_management":{"applied_edits":[]}}`), &want)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("message (-want +got):\n%s\n%s", diff, raw)
	}
}

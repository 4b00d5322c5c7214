package fakeanthropic_test

import (
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/sluice-dev/sluice/fakeanthropic"
)

func TestNewReportsEveryProblem(t *testing.T) {
	_, err := fakeanthropic.New(fakeanthropic.Config{
		Groups: []fakeanthropic.Group{
			{Name: "", Models: []string{"claude-*"}, RPM: 1, InputTPM: 1, OutputTPM: 1},
			{Name: "a", Models: []string{"["}, RPM: 0, InputTPM: 1, OutputTPM: 1},
			{Name: "a", Models: nil, RPM: 1, InputTPM: 1, OutputTPM: 1},
		},
		OTPMMode:        "lazy",
		TokensPerSecond: -1,
		Latency:         -time.Second,
		ReplyTokens:     -3,
		APIKeys:         []string{""},
		Faults: []fakeanthropic.FaultRule{
			{Kind: "gremlins", Rate: 0.1},
			{Kind: fakeanthropic.FaultOverloaded, Rate: 1.5},
		},
	})
	if err == nil {
		t.Fatal("New accepted a bad config")
	}
	for _, want := range []string{
		"groups[0]: name is empty",
		`bad model pattern "["`,
		"must be positive",
		`name "a" is used twice`,
		`group "a": no model patterns`,
		`otpm mode "lazy"`,
		"tokens per second -1",
		"latency -1s",
		"reply tokens -3",
		"api keys[0]: empty key",
		`unknown fault kind "gremlins"`,
		"rate 1.5 is not between 0 and 1",
		"rates add up to 1.6",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestZeroConfigIsTierOne(t *testing.T) {
	fake, srv := newFake(t, fakeanthropic.Config{})
	res, b := post(t, srv, "/v1/messages", rawBody("hi", 100, false), nil)
	if res.StatusCode != 200 {
		t.Fatalf("status %d: %s", res.StatusCode, b)
	}
	got := map[string]string{}
	for _, h := range []string{"requests", "input-tokens", "output-tokens"} {
		got[h] = res.Header.Get("anthropic-ratelimit-" + h + "-limit")
	}
	if diff := cmp.Diff(map[string]string{"requests": "50", "input-tokens": "30000", "output-tokens": "8000"}, got); diff != "" {
		t.Errorf("limits (-want +got):\n%s", diff)
	}
	want := []fakeanthropic.Group{{Name: "claude", Models: []string{"claude-*"}, RPM: 50, InputTPM: 30_000, OutputTPM: 8_000}}
	if diff := cmp.Diff(want, fakeanthropic.TierOne()); diff != "" {
		t.Errorf("TierOne (-want +got):\n%s", diff)
	}
	if st := fake.Stats(); st.AdmittedOutputTokens["claude"] != fakeanthropic.DefaultReplyTokens {
		t.Errorf("admitted output %d: want the default reply length", st.AdmittedOutputTokens["claude"])
	}
}

func TestFaultKinds(t *testing.T) {
	for _, k := range fakeanthropic.FaultKinds() {
		if !k.Valid() {
			t.Errorf("%q is not valid", k)
		}
	}
	if fakeanthropic.FaultKind("gremlins").Valid() || fakeanthropic.FaultKind("").Valid() {
		t.Error("unknown kinds are valid")
	}
}

// Command onion measures kiss-onion's onions on a private Tor network: how
// long serve takes to make its read onion reachable, the memory of serve
// and of its tor, and a 100 MB NAR's download through the onion by nix and
// by curl through the same client tor (loopback for scale). See
// ../README.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/kiss-onion/kiss-onion/onion/testnet"
)

var (
	binary  = flag.String("binary", "bin/kiss-onion", "the kiss-onion binary")
	workDir = flag.String("dir", "/tmp/kiss-onion-onion-bench", "work directory")
	rounds  = flag.Int("rounds", 3, "downloads of each kind")
	sizeMB  = flag.Int("size", 100, "size of the store path, MB")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run() error {
	bin, err := filepath.Abs(*binary)
	if err != nil {
		return err
	}
	os.RemoveAll(*workDir)
	if err := os.MkdirAll(*workDir, 0o755); err != nil {
		return err
	}
	store := filepath.Join(*workDir, "store")
	nixEnv := append(os.Environ(), "NIX_CONFIG=experimental-features = nix-command\nbuild-users-group =\nrequire-sigs = false\nnarinfo-cache-negative-ttl = 0\nsubstituters =")

	// A store path of random data, copied uncompressed into a cache.
	blob := filepath.Join(*workDir, "blob")
	if out, err := exec.Command("dd", "if=/dev/urandom", "of="+blob, "bs=1M", "count="+strconv.Itoa(*sizeMB)).CombinedOutput(); err != nil {
		return fmt.Errorf("dd: %v\n%s", err, out)
	}
	add := exec.Command("nix-store", "--store", store, "--add", blob)
	add.Env = nixEnv
	out, err := add.Output()
	if err != nil {
		return fmt.Errorf("nix-store --add: %v", err)
	}
	path := strings.TrimSpace(string(out))
	cache := filepath.Join(*workDir, "cache")
	cp := exec.Command("nix", "copy", "--store", store, "--to", "file://"+cache+"?compression=none", path)
	cp.Env = append(nixEnv, "XDG_CACHE_HOME="+filepath.Join(*workDir, "xdg0"))
	if out, err := cp.CombinedOutput(); err != nil {
		return fmt.Errorf("nix copy: %v\n%s", err, out)
	}
	nars, _ := filepath.Glob(filepath.Join(cache, "nar", "*"))
	if len(nars) != 1 {
		return fmt.Errorf("want one NAR in %s, found %v", cache, nars)
	}
	narURL := "/nar/" + filepath.Base(nars[0])

	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	fmt.Fprintln(os.Stderr, "starting the private tor network")
	network, err := testnet.Start(ctx, filepath.Join(*workDir, "testnet"), logrus.NewEntry(log))
	if err != nil {
		return err
	}
	defer network.Close()
	netConf := filepath.Join(*workDir, "testnet.torrc")
	os.WriteFile(netConf, []byte(strings.Join(network.TorrcLines(), "\n")+"\n"), 0o644)

	state := filepath.Join(*workDir, "state")
	bundle := filepath.Join(*workDir, "reader.bundle")
	if out, err := exec.Command(bin, "keys", "add", "bench", "--role", "reader", "--state-dir", state, "--out", bundle).CombinedOutput(); err != nil {
		return fmt.Errorf("keys add: %v\n%s", err, out)
	}
	client, err := network.StartClient(ctx, filepath.Join(*workDir, "client"), bundle)
	if err != nil {
		return err
	}
	socks := client.SocksAddr()

	loopback := "127.0.0.1:37599"
	began := time.Now()
	serve := exec.Command(bin, "serve", "--tor", "public", "--tor-config", netConf, "--cache-dir", cache, "--state-dir", state, "--listen", loopback, "--log-level", "warn")
	serve.Stderr = os.Stderr
	serve.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := serve.Start(); err != nil {
		return err
	}
	defer func() { serve.Process.Signal(syscall.SIGTERM); serve.Wait() }()
	var readURL string
	for readURL == "" {
		if b, err := os.ReadFile(filepath.Join(state, "read.onion")); err == nil {
			readURL = "http://" + strings.TrimSpace(string(b))
		}
		time.Sleep(50 * time.Millisecond)
	}
	published := time.Since(began)
	for {
		if _, err := curl(socks, readURL+"/nix-cache-info"); err == nil {
			break
		}
		if time.Since(began) > 5*time.Minute {
			return fmt.Errorf("read onion not reachable after 5 minutes")
		}
		time.Sleep(200 * time.Millisecond)
	}
	reachable := time.Since(began)

	var viaCurl, viaLoop, viaNix []float64
	size := float64(fileSize(nars[0])) / 1e6
	for i := 0; i < *rounds; i++ {
		d, err := curl(socks, readURL+narURL)
		if err != nil {
			return err
		}
		viaCurl = append(viaCurl, size/d)
		d, err = curl("", "http://"+loopback+narURL)
		if err != nil {
			return err
		}
		viaLoop = append(viaLoop, size/d)
		dst := filepath.Join(*workDir, "dst-"+strconv.Itoa(i))
		real := exec.Command("nix-store", "--store", dst, "--realise", path, "--option", "substituters", readURL)
		real.Env = append(nixEnv, "ALL_PROXY=socks5h://"+socks, "XDG_CACHE_HOME="+dst+"-xdg")
		t0 := time.Now()
		if out, err := real.CombinedOutput(); err != nil {
			return fmt.Errorf("nix-store --realise through the onion: %v\n%s", err, out)
		}
		viaNix = append(viaNix, size/time.Since(t0).Seconds())
		os.RemoveAll(dst)
	}

	servePID := serve.Process.Pid
	torPID := childNamed(servePID, "tor")
	fmt.Printf("\n%s, %d MB store path, %d rounds (median)\n\n", time.Now().Format("2006-01-02"), *sizeMB, *rounds)
	fmt.Println("| measurement | value |")
	fmt.Println("|---|---|")
	fmt.Printf("| serve start to onions published | %.1f s |\n", published.Seconds())
	fmt.Printf("| serve start to read onion reachable (client tor already up) | %.1f s |\n", reachable.Seconds())
	fmt.Printf("| serve RSS now / peak | %d / %d MiB |\n", memKiB(servePID, "VmRSS")>>10, memKiB(servePID, "VmHWM")>>10)
	fmt.Printf("| serve's tor RSS now / peak | %d / %d MiB |\n", memKiB(torPID, "VmRSS")>>10, memKiB(torPID, "VmHWM")>>10)
	fmt.Printf("| %d MB NAR through the onion, nix-store --realise (ALL_PROXY=socks5h) | %.1f MB/s |\n", *sizeMB, median(viaNix))
	fmt.Printf("| the same NAR through the onion, curl --socks5-hostname, same client tor | %.1f MB/s |\n", median(viaCurl))
	fmt.Printf("| the same NAR on serve's loopback listener, curl | %.0f MB/s |\n", median(viaLoop))
	return nil
}

// curl fetches url (through the SOCKS proxy socks, when set) to /dev/null
// and returns the seconds it took.
func curl(socks, url string) (float64, error) {
	args := []string{"-sf", "-o", "/dev/null", "-w", "%{time_total}", "--max-time", "600"}
	if socks != "" {
		args = append(args, "--socks5-hostname", socks)
	}
	out, err := exec.Command("curl", append(args, url)...).Output()
	if err != nil {
		return 0, fmt.Errorf("curl %s: %v", url, err)
	}
	return strconv.ParseFloat(strings.TrimSpace(string(out)), 64)
}

func fileSize(p string) int64 {
	fi, err := os.Stat(p)
	if err != nil {
		return 0
	}
	return fi.Size()
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

func memKiB(pid int, field string) int64 {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, field+":"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return 0
}

// childNamed returns the pid of a child of pid whose command is name.
func childNamed(pid int, name string) int {
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, t := range tasks {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pid, t.Name()))
		for _, f := range strings.Fields(string(b)) {
			comm, _ := os.ReadFile("/proc/" + f + "/comm")
			if strings.TrimSpace(string(comm)) == name {
				c, _ := strconv.Atoi(f)
				return c
			}
		}
	}
	return 0
}

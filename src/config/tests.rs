use super::errors::line_and_column;
use super::*;
use crate::gpu::Thresholds;
use crate::units::Mib;

/// A process model's own settings (the test fails if it is another kind).
fn process(spec: &ModelSpec) -> &ProcessSpec {
    spec.process().expect("a process model")
}

/// An Ollama model's own settings (the test fails if it is another kind).
fn ollama(spec: &ModelSpec) -> &OllamaSpec {
    spec.ollama().expect("an Ollama model")
}

fn parse_err(text: &str) -> Box<ConfigError> {
    Config::parse(text, Some(Path::new("/etc/vramgate.toml"))).expect_err("config must be rejected")
}

#[test]
fn empty_config_is_all_defaults() {
    let config = Config::parse("", None).unwrap();
    assert_eq!(config.server.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(config.gpu.probe, ProbeChoice::Auto);
    assert_eq!(config.gpu.reserve_mib, Mib(512));
    assert_eq!(config.gpu.sample_interval.get().as_millis(), 500);
    assert_eq!(config.gpu.thresholds(), Thresholds::default());
    assert_eq!(config.gpu.change_threshold_mib, Mib(100));
    assert_eq!(config.scheduler.max_queue, 512);
    assert_eq!(config.defaults.priority, 50);
}

#[test]
fn design_example_parses() {
    let text = r#"
[server]
listen = "127.0.0.1:9999"
state_dir = "/var/lib/vramgate"

[gpu]
probe = "sim"
reserve_mib = 512
sample_interval = "250ms"
warning_pct = 70.0
critical_pct = 85
emergency_pct = 95.0
[gpu.sim]
dir = "/tmp/vramgate-sim"
devices = [{ name = "Sim 8G", total_mib = 8192 }, { name = "Sim 1.5G", total_mib = "1.5GiB" }]

[scheduler]
max_parallel_loads = 2
queue_timeout = "30s"

[defaults]
ttl = "0"
"#;
    let config = Config::parse(text, None).unwrap();
    assert_eq!(config.server.listen.port(), 9999);
    assert_eq!(config.gpu.probe, ProbeChoice::Sim);
    let sim = config.gpu.sim.unwrap();
    assert_eq!(sim.devices[1].total_mib, Mib(1536));
    assert_eq!(config.gpu.critical_pct, 85.0);
    assert!(config.defaults.ttl.is_zero());
    assert_eq!(config.scheduler.max_parallel_loads, 2);
}

#[test]
fn unknown_key_names_the_key_and_line() {
    let err = parse_err("[gpu]\nprobe = \"none\"\nsampel_interval = \"1s\"\n");
    assert_eq!(err.key.as_deref(), Some("gpu.sampel_interval"));
    assert_eq!(err.line, Some(3));
    let shown = err.to_string();
    assert!(shown.contains("/etc/vramgate.toml, line 3"), "{shown}");
    assert!(shown.contains("sample_interval"), "the message lists the valid keys: {shown}");
}

#[test]
fn unknown_section_is_an_error() {
    let err = parse_err("[gpuu]\nprobe = \"none\"\n");
    assert_eq!(err.key.as_deref(), Some("gpuu"));
    assert_eq!(err.line, Some(1));
}

#[test]
fn wrong_type_names_the_key_and_line() {
    let err = parse_err("\n[gpu]\nwarning_pct = \"high\"\n");
    assert_eq!(err.key.as_deref(), Some("gpu.warning_pct"));
    assert_eq!(err.line, Some(3));
}

#[test]
fn nvml_library_defaults_to_the_system_one_and_takes_a_path() {
    let config = Config::parse("", None).unwrap();
    assert_eq!(config.gpu.nvml.library(), Path::new("libnvidia-ml.so.1"));
    let config = Config::parse("[gpu.nvml]\nlibrary = \"/usr/lib/wsl/lib/libnvidia-ml.so.1\"\n", None).unwrap();
    assert_eq!(config.gpu.nvml.library(), Path::new("/usr/lib/wsl/lib/libnvidia-ml.so.1"));
}

#[test]
fn an_empty_nvml_library_or_an_unknown_key_is_named() {
    let err = parse_err("[gpu.nvml]\nlibrary = \"\"\n");
    assert_eq!(err.key.as_deref(), Some("gpu.nvml.library"));
    assert!(err.message.contains("leave it out"), "{}", err.message);
    let err = parse_err("[gpu.nvml]\nlib = \"/x\"\n");
    assert_eq!(err.key.as_deref(), Some("gpu.nvml.lib"));
    assert_eq!(err.line, Some(2));
}

#[test]
fn bad_enum_value_names_the_key() {
    let err = parse_err("[gpu]\nprobe = \"cuda\"\n");
    assert_eq!(err.key.as_deref(), Some("gpu.probe"));
    assert_eq!(err.line, Some(2));
    assert!(err.message.contains("nvml"), "lists the choices: {}", err.message);
}

#[test]
fn warning_above_critical_is_placed_on_its_line() {
    let err = parse_err("[gpu]\nprobe = \"none\"\n\nwarning_pct = 90\n");
    assert_eq!(err.key.as_deref(), Some("gpu.warning_pct"));
    assert_eq!(err.line, Some(4));
    assert!(err.message.contains("critical_pct (87.5)"), "{}", err.message);
    assert!(err.to_string().contains("    4 | warning_pct = 90"), "{err}");
}

#[test]
fn critical_above_emergency_and_out_of_range_percentages() {
    let err = parse_err("[gpu]\ncritical_pct = 96\n");
    assert_eq!(err.key.as_deref(), Some("gpu.critical_pct"));
    let err = parse_err("[gpu]\nemergency_pct = 120\n");
    assert_eq!(err.key.as_deref(), Some("gpu.emergency_pct"));
    assert_eq!(err.line, Some(2));
}

#[test]
fn negative_sizes_are_errors_with_the_line() {
    let err = parse_err("[gpu]\nreserve_mib = -512\n");
    assert_eq!(err.key.as_deref(), Some("gpu.reserve_mib"));
    assert_eq!(err.line, Some(2));
    assert!(err.message.contains("negative"), "{}", err.message);
    let err = parse_err("[gpu]\nchange_threshold_mib = \"-1GiB\"\n");
    assert!(err.message.contains("negative"), "{}", err.message);
}

#[test]
fn bad_size_and_duration_strings_quote_the_value() {
    let err = parse_err("[gpu]\nreserve_mib = \"half\"\n");
    assert!(err.message.contains("\"half\""), "{}", err.message);
    let err = parse_err("[gpu]\nsample_interval = \"fast\"\n");
    assert_eq!(err.key.as_deref(), Some("gpu.sample_interval"));
    assert!(err.message.contains("\"fast\""), "{}", err.message);
}

#[test]
fn too_short_sample_interval() {
    let err = parse_err("[gpu]\nsample_interval = \"0\"\n");
    assert_eq!(err.key.as_deref(), Some("gpu.sample_interval"));
    assert_eq!(err.line, Some(2));
}

#[test]
fn sim_probe_without_section() {
    let err = parse_err("[gpu]\nprobe = \"sim\"\n");
    assert_eq!(err.key.as_deref(), Some("gpu.probe"));
    assert_eq!(err.line, Some(2));
}

#[test]
fn sim_device_problems_point_into_the_inline_array() {
    let text = "[gpu]\nprobe = \"sim\"\n[gpu.sim]\ndir = \"/tmp/x\"\ndevices = [\n  { name = \"a\", total_mib = 8192 },\n  { name = \"b\", total_mib = 0 },\n]\n";
    let err = parse_err(text);
    assert_eq!(err.key.as_deref(), Some("gpu.sim.devices[1].total_mib"));
    assert_eq!(err.line, Some(7));
    let err = parse_err("[gpu.sim]\ndevices = []\n");
    assert_eq!(err.key.as_deref(), Some("gpu.sim.devices"));
    assert_eq!(err.line, Some(2));
}

#[test]
fn sim_release_lag_defaults_to_zero_and_is_bounded() {
    let base = "[gpu]\nprobe = \"sim\"\n[gpu.sim]\ndir = \"/tmp/x\"\n";
    let config = Config::parse(base, None).unwrap();
    assert!(config.gpu.sim.unwrap().release_lag.is_zero());
    let config = Config::parse(&format!("{base}release_lag = \"300ms\"\n"), None).unwrap();
    assert_eq!(config.gpu.sim.unwrap().release_lag.get(), std::time::Duration::from_millis(300));
    let err = parse_err(&format!("{base}release_lag = \"2m\"\n"));
    assert_eq!(err.key.as_deref(), Some("gpu.sim.release_lag"));
    assert_eq!(err.line, Some(5));
    assert!(err.message.contains("at most 1m") && err.message.contains("found 2m"), "{err}");
    let err = parse_err(&format!("{base}release_lag = \"soon\"\n"));
    assert_eq!(err.key.as_deref(), Some("gpu.sim.release_lag"), "{err}");
}

#[test]
fn sim_devices_as_array_of_tables() {
    let text = "[gpu]\nprobe = \"sim\"\n[[gpu.sim.devices]]\nname = \"a\"\ntotal_mib = 100\n";
    let err = parse_err(text);
    assert_eq!(err.key.as_deref(), Some("gpu.sim.devices[0].total_mib"));
    assert_eq!(err.line, Some(5), "{err}");
    assert!(err.message.contains("reserve_mib"));
}

#[test]
fn unknown_key_inside_a_sim_device() {
    let err = parse_err("[gpu.sim]\ndevices = [{ name = \"a\", total = 8192 }]\n");
    assert_eq!(err.key.as_deref(), Some("gpu.sim.devices[0].total"));
    assert_eq!(err.line, Some(2));
}

#[test]
fn syntax_error_has_a_line() {
    let err = parse_err("[gpu]\nprobe = \n");
    assert_eq!(err.line, Some(2));
    assert!(err.key.is_none());
}

/// Parses with no token from the environment, whatever the test's environment says.
fn parse_without_env(text: &str) -> Result<Config, Box<ConfigError>> {
    Config::parse_with_token(text, None, None)
}

#[test]
fn non_loopback_listen_without_token_is_refused_naming_the_keys() {
    for listen in ["0.0.0.0:9777", "192.168.1.20:9777", "[::]:9777"] {
        let text = format!("[gpu]\nprobe = \"none\"\n\n[server]\nlisten = \"{listen}\"\n");
        let err = parse_without_env(&text).expect_err(listen);
        assert_eq!(err.key.as_deref(), Some("server.listen"), "{listen}");
        assert_eq!(err.line, Some(5), "{listen}");
        for named in ["server.token", "VRAMGATE_TOKEN", "server.allow_unauthenticated"] {
            assert!(err.message.contains(named), "{listen}: {named} not in {}", err.message);
        }
    }
}

#[test]
fn non_loopback_listen_is_accepted_with_a_token_or_explicitly_unauthenticated() {
    let with_token = parse_without_env("[server]\nlisten = \"0.0.0.0:9777\"\ntoken = \"s3cret\"\n").expect("token");
    assert_eq!(with_token.server.token, Some(Token::new("s3cret")));
    let open = parse_without_env("[server]\nlisten = \"0.0.0.0:9777\"\nallow_unauthenticated = true\n")
        .expect("allow_unauthenticated");
    assert!(open.server.token.is_none());
    // The environment's token counts as a token, and wins over the file's.
    let from_env = Config::parse_with_token(
        "[server]\nlisten = \"0.0.0.0:9777\"\ntoken = \"file\"\n",
        None,
        Some(Token::new("env")),
    )
    .expect("env token");
    assert_eq!(from_env.server.token, Some(Token::new("env")));
    for loopback in ["127.0.0.1:9777", "127.0.0.2:1", "[::1]:9777", "[::ffff:127.0.0.1]:9777"] {
        parse_without_env(&format!("[server]\nlisten = \"{loopback}\"\n")).expect(loopback);
    }
}

#[test]
fn listen_override_is_checked_against_the_token() {
    let mut config = parse_without_env("").expect("empty config");
    config.server.listen = "0.0.0.0:0".parse().expect("address");
    let err = config.check_exposure().expect_err("exposed without a token");
    assert_eq!(err.key.as_deref(), Some("server.listen"));
    assert!(err.message.starts_with("--listen 0.0.0.0:0 "), "{}", err.message);
    config.server.token = Some(Token::new("s3cret"));
    config.check_exposure().expect("with a token");
}

#[test]
fn a_malformed_token_is_not_echoed_by_the_error() {
    for text in
        ["[server]\ntoken = 12345678\n", "[server]\ntoken = \"abc\n", "server = { token = \"s3cr3t\", bogus = 1 }\n"]
    {
        let err = parse_without_env(text).expect_err(text);
        let shown = err.to_string();
        for secret in ["12345678", "abc", "s3cr3t"] {
            assert!(!shown.contains(secret), "{text:?}: the error shows the token: {shown}");
        }
    }
}

#[test]
fn unusable_tokens_are_refused() {
    for token in ["", "two words", "tab\\there", "caf\u{e9}"] {
        let err = parse_without_env(&format!("[server]\ntoken = \"{token}\"\n")).expect_err(token);
        assert_eq!(err.key.as_deref(), Some("server.token"), "{token:?}");
        assert_eq!(err.line, Some(2), "{token:?}");
        assert_eq!(err.source_line, None, "the token's line is not echoed");
    }
}

#[test]
fn the_token_never_shows_in_debug_or_serialized_output() {
    let config = parse_without_env("[server]\ntoken = \"s3cret-value\"\n").expect("token");
    assert!(!format!("{config:?}").contains("s3cret-value"));
    let serialized = toml::to_string(&config).expect("serialize");
    assert!(!serialized.contains("s3cret-value"), "{serialized}");
}

#[test]
fn bad_listen_address() {
    let err = parse_err("[server]\nlisten = \"localhost\"\n");
    assert_eq!(err.key.as_deref(), Some("server.listen"));
    assert_eq!(err.line, Some(2));
}

#[test]
fn scheduler_and_defaults_are_checked() {
    let err = parse_err("[scheduler]\nmax_parallel_loads = 0\n");
    assert_eq!(err.key.as_deref(), Some("scheduler.max_parallel_loads"));
    let err = parse_err("[defaults]\nready_timeout = \"0\"\n");
    assert_eq!(err.key.as_deref(), Some("defaults.ready_timeout"));
    let err = parse_err("[defaults]\nttl = \"soon\"\n");
    assert_eq!(err.key.as_deref(), Some("defaults.ttl"));
}

const SIM: &str =
    "[gpu]\nprobe = \"sim\"\n[gpu.sim]\ndir = \"/tmp/x\"\ndevices = [{ name = \"a\", total_mib = 8192 }]\n";

#[test]
fn models_get_defaults_and_their_own_settings() {
    let text = format!(
        "{SIM}[defaults]\nttl = \"5m\"\npriority = 10\n[models.whisper]\nbackend = \"process\"\ncmd = \"whisper-server --port ${{PORT}} --model 'large v3'\"\nvram = \"1500MiB\"\npriority = 100\npinned = true\naliases = [\"stt\"]\nenv = {{ THREADS = \"4\" }}\n[models.llm]\nbackend = \"process\"\ncmd = [\"llama-server\", \"--port\", \"${{PORT}}\"]\nhealth = \"none\"\n"
    );
    let config = Config::parse(&text, None).unwrap();
    let specs = config.model_specs();
    assert_eq!(specs.len(), 2);
    let llm = &specs[0];
    assert_eq!(llm.id, "llm");
    assert_eq!(llm.priority, 10);
    assert_eq!(llm.ttl.as_secs(), 300);
    assert_eq!(process(llm).health, None);
    assert_eq!(llm.declared_mib, None);
    let whisper = &specs[1];
    assert_eq!(process(whisper).argv, vec!["whisper-server", "--port", "${PORT}", "--model", "large v3"]);
    assert_eq!(process(whisper).health.as_deref(), Some("/health"));
    assert_eq!((whisper.priority, whisper.pinned, whisper.declared_mib), (100, true, Some(1500)));
    assert_eq!(whisper.release_timeout.as_secs(), 5);
    assert_eq!(process(whisper).env["THREADS"], "4");
}

#[test]
fn a_process_model_without_cmd() {
    let err = parse_err("[models.llm]\nbackend = \"process\"\n");
    assert_eq!(err.key.as_deref(), Some("models.llm"));
    assert_eq!(err.line, Some(1));
    assert!(err.message.contains("needs `cmd`"), "{}", err.message);
}

#[test]
fn backend_specific_keys_are_checked() {
    let ok = Config::parse(
        "[models.llama]\nbackend = \"ollama\"\nollama_model = \"llama3.2:3b\"\noptions = { num_ctx = 8192 }\n\
         [models.clip]\nbackend = \"external\"\nvram = \"1GiB\"\non_evict = \"cpu\"\n",
        None,
    )
    .unwrap();
    let specs = ok.model_specs();
    let llama = specs.iter().find(|m| m.id == "llama").unwrap();
    assert_eq!(ollama(llama).url, DEFAULT_OLLAMA_URL);
    assert_eq!(ollama(llama).options["num_ctx"], 8192);
    assert!(specs.iter().all(ModelSpec::has_cpu_form));

    let err = parse_err("[models.llama]\nbackend = \"ollama\"\n");
    assert_eq!(err.key.as_deref(), Some("models.llama"));
    assert!(err.message.contains("ollama_model"), "{err}");
    let err = parse_err("[models.llama]\nbackend = \"ollama\"\nollama_model = \"x\"\ncmd = \"x\"\n");
    assert_eq!((err.key.as_deref(), err.line), (Some("models.llama.cmd"), Some(4)));
    let err = parse_err("[models.llama]\nbackend = \"ollama\"\nollama_model = \"x\"\nweights = \"m.gguf\"\n");
    assert_eq!((err.key.as_deref(), err.line), (Some("models.llama.weights"), Some(4)));
    let err = parse_err("[models.llama]\nbackend = \"ollama\"\nollama_model = \"x\"\nurl = \"localhost:1\"\n");
    assert_eq!(err.key.as_deref(), Some("models.llama.url"));
    let err = parse_err("[models.clip]\nbackend = \"external\"\n");
    assert!(err.message.contains("needs `vram`"), "{err}");
    let err = parse_err("[models.llm]\nbackend = \"process\"\ncmd = \"x\"\non_evict = \"cpu\"\n");
    assert_eq!(err.key.as_deref(), Some("models.llm.on_evict"));
    assert!(err.message.contains("cpu_cmd"), "{err}");
    let err = parse_err("[models.llm]\nbackend = \"process\"\ncmd = \"x\"\nollama_model = \"y\"\n");
    assert_eq!(err.key.as_deref(), Some("models.llm.ollama_model"));
}

#[test]
fn modes_name_real_models_once_and_cpu_needs_a_cpu_form() {
    let models = "[models.a]\nbackend = \"process\"\ncmd = \"x\"\n[models.b]\nbackend = \"process\"\ncmd = \"y\"\ncpu_cmd = \"y -ngl 0\"\n";
    let ok = Config::parse(
        &format!("[server]\ninitial_mode = \"m\"\n{models}[modes.m]\ngpu = [\"a\"]\nload = [\"a\"]\ncpu = [\"b\"]\n"),
        None,
    )
    .unwrap();
    assert_eq!(ok.modes["m"].gpu_models(), ["a"]);
    let err = parse_err(&format!("{models}[modes.m]\ngpu = [\"zz\"]\n"));
    assert_eq!(err.key.as_deref(), Some("modes.m.gpu[0]"));
    let err = parse_err(&format!("{models}[modes.m]\ngpu = [\"a\"]\nunload = [\"a\"]\n"));
    assert_eq!(err.key.as_deref(), Some("modes.m.unload[0]"));
    assert!(err.message.contains("also listed in `gpu`"), "{err}");
    let err = parse_err(&format!("{models}[modes.m]\ncpu = [\"a\"]\n"));
    assert!(err.message.contains("no CPU form"), "{err}");
    let err = parse_err(&format!("[server]\ninitial_mode = \"x\"\n{models}"));
    assert_eq!((err.key.as_deref(), err.line), (Some("server.initial_mode"), Some(2)));
    let err = parse_err(&format!("{models}[modes.m]\ngpus = [\"a\"]\n"));
    assert!(err.message.contains("gpus"), "{err}");
}

#[test]
fn max_queue_zero_and_an_ollama_url_with_a_path_are_refused() {
    let err = parse_err("[scheduler]\nmax_queue = 0\n");
    assert_eq!((err.key.as_deref(), err.line), (Some("scheduler.max_queue"), Some(2)));
    let err =
        parse_err("[models.llama]\nbackend = \"ollama\"\nollama_model = \"x\"\nurl = \"http://127.0.0.1:11434/api\"\n");
    assert_eq!(err.key.as_deref(), Some("models.llama.url"));
    assert!(err.message.contains("without a path"), "{err}");
    let ok = Config::parse(
        "[models.llama]\nbackend = \"ollama\"\nollama_model = \"x\"\nurl = \"http://gpu-box:11434/\"\n",
        None,
    )
    .unwrap();
    assert_eq!(ollama(&ok.model_specs()[0]).url, "http://gpu-box:11434");
}

#[test]
fn an_external_model_never_idles_out_unless_it_sets_a_ttl() {
    let config = Config::parse(
        "[defaults]\nttl = \"1m\"\n[models.clip]\nbackend = \"external\"\nvram = 1000\n\
         [models.vlm]\nbackend = \"external\"\nvram = 1000\nttl = \"5m\"\n",
        None,
    )
    .unwrap();
    let specs = config.model_specs();
    assert_eq!(specs[0].ttl, std::time::Duration::ZERO);
    assert_eq!(specs[1].ttl, std::time::Duration::from_secs(300));
}

#[test]
fn an_unknown_backend() {
    let err = parse_err("[models.llm]\nbackend = \"docker\"\ncmd = \"x\"\n");
    assert_eq!(err.key.as_deref(), Some("models.llm.backend"));
    assert_eq!(err.line, Some(2));
    assert!(err.message.contains("process"), "{}", err.message);
}

#[test]
fn a_model_key_typo() {
    let err = parse_err("[models.llm]\nbackend = \"process\"\ncmd = \"x\"\nvrma = \"1G\"\n");
    assert_eq!(err.key.as_deref(), Some("models.llm.vrma"));
    assert_eq!(err.line, Some(4));
    assert!(err.message.starts_with("unknown field `vrma`, did you mean `vram`? (expected"), "{}", err.message);
}

#[test]
fn typos_get_the_closest_known_name_when_it_is_close() {
    let suggestion = |text: &str| parse_err(text).message;
    assert!(suggestion("[gpuu]\n").contains("did you mean `gpu`?"));
    assert!(suggestion("[gpu]\nsampel_interval = \"1s\"\n").contains("did you mean `sample_interval`?"));
    assert!(suggestion("[gpu]\nprobe = \"simm\"\n").contains("did you mean `sim`?"));
    assert!(suggestion("[defaults]\nprioirty = 3\n").contains("did you mean `priority`?"));
    assert!(suggestion("[models.a]\nbackend = \"process\"\ncmd = \"x\"\nVRAM = 1\n").contains("did you mean `vram`?"));
    // Nothing near: the plain message with the list of valid names, no wild guess.
    let far = suggestion("[gpu]\ncolour = \"green\"\n");
    assert!(!far.contains("did you mean"), "{far}");
    assert!(far.contains("expected one of") && far.contains("`probe`"), "{far}");
    let far = suggestion("[gpu]\nprobe = \"cuda\"\n");
    assert!(!far.contains("did you mean"), "{far}");
}

#[test]
fn probe_choices_read_as_in_the_config() {
    for word in ["auto", "nvml", "amd", "sim", "none"] {
        let probe: ProbeChoice = serde_json::from_value(serde_json::Value::String(word.into())).unwrap();
        assert_eq!(probe.to_string(), word);
    }
}

#[test]
fn relative_paths_in_models_are_anchored_to_the_config_file() {
    let text = "[models.a]\nbackend = \"process\"\ncmd = [\"./bin/server.sh\", \"--port\", \"${PORT}\"]\n\
                cpu_cmd = \"bin/server.sh --cpu\"\n\
                [models.b]\nbackend = \"process\"\ncmd = \"./server\"\ncwd = \"work\"\n\
                [models.c]\nbackend = \"process\"\ncmd = \"llama-server --port ${PORT}\"\ncwd = \"/srv/llama\"\n\
                weights = \"models/a.gguf\"\n\
                [models.d]\nbackend = \"process\"\ncmd = \"/usr/bin/server\"\nweights = \"/m/d.gguf\"\n";
    let config = Config::parse(text, Some(Path::new("/etc/vramgate/vramgate.toml"))).unwrap();
    let specs = config.model_specs();
    let spec = |id: &str| specs.iter().find(|s| s.id == id).unwrap();
    assert_eq!(process(spec("a")).argv, vec!["/etc/vramgate/bin/server.sh", "--port", "${PORT}"]);
    assert_eq!(
        process(spec("a")).cpu_argv.as_deref(),
        Some(&["/etc/vramgate/bin/server.sh".to_string(), "--cpu".into()][..])
    );
    assert_eq!(process(spec("a")).cwd, None);
    // With a cwd, the program is where it would be from that directory.
    assert_eq!(process(spec("b")).cwd.as_deref(), Some(Path::new("/etc/vramgate/work")));
    assert_eq!(process(spec("b")).argv, vec!["/etc/vramgate/work/server"]);
    // Bare names stay for the PATH lookup; absolute paths stay as they are.
    assert_eq!(process(spec("c")).argv[0], "llama-server");
    assert_eq!(process(spec("c")).cwd.as_deref(), Some(Path::new("/srv/llama")));
    assert_eq!(process(spec("d")).argv[0], "/usr/bin/server");
    // The weights file likewise: against the cwd, else the config's directory; absolute as is.
    assert_eq!(process(spec("c")).weights.as_deref(), Some(Path::new("/srv/llama/models/a.gguf")));
    assert_eq!(process(spec("d")).weights.as_deref(), Some(Path::new("/m/d.gguf")));
    assert_eq!(process(spec("a")).weights, None);
    // Without a file there is nothing to anchor to.
    let unanchored = Config::parse(text, None).unwrap().model_specs();
    assert_eq!(process(&unanchored[0]).argv[0], "./bin/server.sh");
}

#[test]
fn programs_that_cannot_be_found_are_warnings_naming_the_model_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("model.sh");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    let plain = dir.path().join("plain.txt");
    std::fs::write(&plain, "").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let text = "[models.ok]\nbackend = \"process\"\ncmd = \"./model.sh --port ${PORT}\"\ncpu_cmd = \"sh -c true\"\n\
                [models.typo]\nbackend = \"process\"\ncmd = [\"nosuchprogram-xyz\", \"--port\", \"${PORT}\"]\n\
                [models.gone]\nbackend = \"process\"\ncmd = \"sh\"\ncpu_cmd = \"./missing.sh\"\n\
                [models.plain]\nbackend = \"process\"\ncmd = \"./plain.txt\"\n\
                [models.later]\nbackend = \"process\"\ncmd = \"${MODEL_ID}-server\"\n";
    let file = dir.path().join("vramgate.toml");
    std::fs::write(&file, text).unwrap();
    let config = Config::load(&file).unwrap();
    let warnings = config.warnings();
    let keys: Vec<&str> = warnings.iter().filter_map(|w| w.key.as_deref()).collect();
    assert_eq!(keys, vec!["models.gone.cpu_cmd", "models.plain.cmd", "models.typo.cmd"], "{warnings:?}");
    let typo = warnings[2].to_string();
    assert!(typo.contains(", line 7") && typo.contains("\"nosuchprogram-xyz\" is not found on PATH"), "{typo}");
    let gone = warnings[0].to_string();
    assert!(gone.contains("\"./missing.sh\" (resolved to") && gone.contains("does not exist"), "{gone}");
    assert!(warnings[1].message.contains("is not executable"), "{}", warnings[1]);
}

#[test]
fn a_device_that_does_not_exist_and_vram_larger_than_the_device() {
    let err = parse_err(&format!("{SIM}[models.llm]\nbackend = \"process\"\ncmd = \"x\"\ndevice = 1\n"));
    assert_eq!(err.key.as_deref(), Some("models.llm.device"));
    assert_eq!(err.line, Some(9));
    assert!(err.message.contains("does not exist"), "{}", err.message);
    let err = parse_err(&format!("{SIM}[models.llm]\nbackend = \"process\"\ncmd = \"x\"\nvram = \"9G\"\n"));
    assert_eq!(err.key.as_deref(), Some("models.llm.vram"));
    assert_eq!(err.line, Some(9));
    assert!(err.message.contains("7680 MiB usable"), "{}", err.message);
}

#[test]
fn device_checks_after_the_probe_lists_devices() {
    let config = Config::parse("[models.llm]\nbackend = \"process\"\ncmd = \"x\"\ndevice = 2\n", None).unwrap();
    let err = config.check_devices(&[8192]).unwrap_err();
    assert_eq!((err.key.as_deref(), err.line), (Some("models.llm.device"), Some(4)));
    assert!(config.check_devices(&[8192, 8192, 24576]).is_ok());
}

#[test]
fn two_models_claiming_the_same_alias() {
    let text = "[models.a]\nbackend = \"process\"\ncmd = \"x\"\naliases = [\"chat\"]\n[models.b]\nbackend = \"process\"\ncmd = \"y\"\naliases = [\"chat\"]\n";
    let err = parse_err(text);
    assert_eq!(err.key.as_deref(), Some("models.b.aliases[0]"));
    assert_eq!(err.line, Some(8));
    assert!(err.message.contains("already an alias of model \"a\""), "{}", err.message);
    let err = parse_err(
        "[models.a]\nbackend = \"process\"\ncmd = \"x\"\n[models.b]\nbackend = \"process\"\ncmd = \"y\"\naliases = [\"a\"]\n",
    );
    assert!(err.message.contains("id of another model"), "{}", err.message);
}

#[test]
fn bad_commands_and_health() {
    let err = parse_err("[models.a]\nbackend = \"process\"\ncmd = \"x 'unclosed\"\n");
    assert_eq!(err.key.as_deref(), Some("models.a.cmd"));
    let err = parse_err("[models.a]\nbackend = \"process\"\ncmd = []\n");
    assert_eq!(err.key.as_deref(), Some("models.a.cmd"));
    let err = parse_err("[models.a]\nbackend = \"process\"\ncmd = \"x\"\nhealth = \"health\"\n");
    assert_eq!((err.key.as_deref(), err.line), (Some("models.a.health"), Some(4)));
}

#[test]
fn sample_interval_has_a_ceiling_too() {
    let err = parse_err("[gpu]\nprobe = \"none\"\nsample_interval = \"61s\"\n");
    assert_eq!((err.key.as_deref(), err.line), (Some("gpu.sample_interval"), Some(3)));
    assert!(err.message.contains("at most 1m") && err.message.contains("found 1m 1s"), "{err}");
    assert!(Config::parse("[gpu]\nsample_interval = \"1m\"\n", None).is_ok());
}

/// The values of issue 11 that `config check` used to accept and `serve` could not handle:
/// each is refused with its key and line.
#[test]
fn absurd_durations_and_sizes_are_refused_with_key_and_line() {
    let cases = [
        ("[defaults]\nready_timeout = 18446744073709551615\n", "defaults.ready_timeout", 2),
        ("[proxy]\nstall_timeout = \"300000000000y\"\n", "proxy.stall_timeout", 2),
        ("[gpu]\nprobe = \"none\"\nsample_interval = \"300000000000y\"\n", "gpu.sample_interval", 3),
        ("[scheduler]\nqueue_timeout = 1e300\n", "scheduler.queue_timeout", 2),
        ("[proxy]\nclient_timeout = \"2y\"\n", "proxy.client_timeout", 2),
        ("[proxy]\nmax_body = \"99999999999999999999G\"\n", "proxy.max_body", 2),
        ("[gpu]\nreserve_mib = 9223372036854775807\n", "gpu.reserve_mib", 2),
        ("[models.a]\nbackend = \"process\"\ncmd = \"x\"\nttl = \"1y 1s\"\n", "models.a.ttl", 4),
        ("[models.a]\nbackend = \"external\"\nvram = \"17TiB\"\n", "models.a.vram", 3),
    ];
    for (text, key, line) in cases {
        let err = parse_err(text);
        assert_eq!((err.key.as_deref(), err.line), (Some(key), Some(line)), "{text}: {err}");
        assert!(err.message.contains("too large"), "{text}: {err}");
    }
}

#[test]
fn invalid_utf8_names_the_file_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vramgate.toml");
    std::fs::write(&path, b"[gpu]\nprobe = \"none\"\n# caf\xE9 au lait\n").unwrap();
    let err = Config::load(&path).unwrap_err();
    assert_eq!((err.line, err.column), (Some(3), Some(6)), "{err}");
    let shown = err.to_string();
    assert!(shown.starts_with(&format!("{}, line 3, column 6: ", path.display())), "{shown}");
    assert!(shown.contains("not valid UTF-8") && shown.contains("0xE9"), "{shown}");
    // On the first line, and as the very first byte.
    std::fs::write(&path, b"\xFF").unwrap();
    let err = Config::load(&path).unwrap_err();
    assert_eq!((err.line, err.column), (Some(1), Some(1)), "{err}");
}

#[test]
fn unreadable_file_is_a_clear_error() {
    let err = Config::load(Path::new("/nonexistent/vramgate.toml")).unwrap_err();
    assert!(err.to_string().starts_with("/nonexistent/vramgate.toml: cannot read the config file"), "{err}");
}

#[test]
fn line_and_column_arithmetic() {
    assert_eq!(line_and_column("abc", 0), (1, 1));
    assert_eq!(line_and_column("a\nbc", 3), (2, 2));
    assert_eq!(line_and_column("a\n", 2), (2, 1));
}

#[test]
fn each_backend_carries_only_its_own_settings() {
    let config = Config::parse(
        "[models.llm]\nbackend = \"process\"\ncmd = \"llama-server --port ${PORT}\"\ncpu_cmd = \"llama-server -ngl 0\"\n\
         [models.llama]\nbackend = \"ollama\"\nollama_model = \"llama3.2:3b\"\nurl = \"http://gpu-box:11434/\"\n\
         [models.clip]\nbackend = \"external\"\nvram = \"1GiB\"\nack_timeout = \"5s\"\n\
         [models.vlm]\nbackend = \"external\"\nvram = \"1GiB\"\n",
        None,
    )
    .unwrap();
    let specs = config.model_specs();
    let spec = |id: &str| specs.iter().find(|s| s.id == id).unwrap();

    // A process model: a command and a health check, and no Ollama URL to carry.
    let llm = spec("llm");
    match &llm.backend {
        BackendSpec::Process(ProcessSpec { argv, health, cpu_argv, .. }) => {
            assert_eq!(argv, &["llama-server", "--port", "${PORT}"]);
            assert_eq!(health.as_deref(), Some("/health"));
            assert_eq!(cpu_argv.as_deref(), Some(&["llama-server".to_string(), "-ngl".into(), "0".into()][..]));
        }
        other => panic!("llm is a process model, found {other:?}"),
    }
    assert_eq!((llm.kind(), llm.kind().as_str()), (Backend::Process, "process"));
    assert!(llm.ollama().is_none() && llm.external().is_none());

    // An Ollama model: its name, its server and no command.
    let llama = spec("llama");
    match &llama.backend {
        BackendSpec::Ollama(OllamaSpec { model, url, options }) => {
            assert_eq!((model.as_str(), url.as_str()), ("llama3.2:3b", "http://gpu-box:11434"));
            assert!(options.is_empty());
        }
        other => panic!("llama is an Ollama model, found {other:?}"),
    }
    assert_eq!((llama.kind(), llama.kind().as_str()), (Backend::Ollama, "ollama"));
    assert!(llama.process().is_none() && llama.external().is_none());

    // An external model: only its acknowledgement limit, defaulted when unset.
    let clip = spec("clip");
    assert_eq!(clip.backend, BackendSpec::External(ExternalSpec { ack_timeout: std::time::Duration::from_secs(5) }));
    assert_eq!((clip.kind(), clip.kind().as_str()), (Backend::External, "external"));
    assert!(clip.process().is_none() && clip.ollama().is_none());
    assert_eq!(spec("vlm").external().map(|e| e.ack_timeout), Some(DEFAULT_ACK_TIMEOUT));
}

"""Screenshots of the chat page on real SmolLM2 artifacts (the README's pictures): one direct
answer from SmolLM2-135M-Instruct int8, one hybrid-loop answer from the SVAMP-tuned int8 model
with its memory model, reasoning panel open.

    make reasoning-model   # the tuned artifact and memory model
    python benchmarks/ui_screenshots.py --out docs/

Needs Debian's chromium + chromium-driver and selenium (test extra); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.launch import ServerProcess  # noqa: E402


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,820"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=opts)


def ask(driver, url: str, model: str, text: str, loops: str, max_tokens: str, out: Path, timeout: float = 180):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(url + "/")
    WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    driver.find_element(By.ID, "loops").send_keys(loops)
    driver.find_element(By.ID, "temperature").clear()
    driver.find_element(By.ID, "temperature").send_keys("0")  # greedy: the same picture every run
    driver.find_element(By.ID, "max-tokens").clear()
    driver.find_element(By.ID, "max-tokens").send_keys(max_tokens)
    driver.find_element(By.ID, "prompt").send_keys(text)
    driver.find_element(By.ID, "send").click()
    WebDriverWait(driver, timeout).until(
        lambda d: "TTFT" in d.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats")[-1].text)
    for summary in driver.find_elements(By.CSS_SELECTOR, "details.reasoning summary"):
        summary.click()
    time.sleep(0.3)
    driver.save_screenshot(str(out))
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chat", default="artifacts/smollm2-135m-instruct-int8")
    p.add_argument("--reasoning", default="artifacts/smollm2-135m-svamp-int8")
    p.add_argument("--memory-model", default="checkpoints/mm-8m-svamp-sft")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    srv = ServerProcess(["--artifact", f"smollm2-chat={a.chat}", "--artifact", f"smollm2-svamp={a.reasoning}",
                         "--memory-model", a.memory_model, "--threads", "2", "--hybrid-cot-groups", "1",
                         "--hybrid-cot-group-tokens", "24", "--hybrid-condense-tokens", "64"])
    driver = browser()
    try:
        ask(driver, srv.url, "smollm2-chat", "What is the capital of France? Answer in one sentence.", "0", "40",
            a.out / "ui-direct.png")
        ask(driver, srv.url, "smollm2-svamp", "Dan had 12 marbles. He gave 5 to his sister and then bought 9 more. "
            "How many marbles does Dan have now?", "1", "30", a.out / "ui-hybrid.png")
    finally:
        driver.quit()
        srv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

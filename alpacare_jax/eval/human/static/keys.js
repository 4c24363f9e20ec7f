// Keyboard shortcuts on the rating page: digits pick a choice (each radio names its key in data-key),
// Enter saves, the arrow keys go to the previous / next item. Typing in the comment box is left alone.
document.addEventListener("keydown", (event) => {
  if (event.target.matches("textarea, input[type=text]") || event.altKey || event.ctrlKey || event.metaKey) return;
  const radio = document.querySelector(`input[type=radio][data-key="${event.key}"]`);
  const link = { ArrowLeft: "previous", ArrowRight: "next" }[event.key];
  if (radio) {
    radio.checked = true;
  } else if (event.key === "Enter") {
    document.getElementById("vote").requestSubmit();
  } else if (link && document.getElementById(link)) {
    window.location = document.getElementById(link).href;
  } else {
    return;
  }
  event.preventDefault();
});
